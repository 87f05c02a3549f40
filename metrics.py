"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap, on its 0-1 scale.

Scores are computed in one call over the whole split (never averaged over batches). METEOR and the PTB tokenizer run
on Java; SPICE is left out (it needs downloads that do not work offline).
"""

import shutil
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


class JavaMissingError(RuntimeError):
    pass


def require_java() -> None:
    if shutil.which("java") is None:
        raise JavaMissingError(
            "METEOR and the PTB tokenizer (pycocoevalcap) need Java, which is not on PATH: "
            "install a Java runtime, e.g. `apt-get install default-jre-headless` (Debian, Ubuntu) "
            "or `brew install openjdk` (macOS)"
        )


def score_captions(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """Corpus-level metrics of one candidate per image against that image's references."""
    if set(references) != set(candidates):
        raise ValueError("references and candidates must cover the same images")
    if not candidates:
        raise ValueError("no captions to score")
    require_java()
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({key: [{"caption": text} for text in texts] for key, texts in references.items()})
    hyps = tokenizer.tokenize({key: [{"caption": text}] for key, text in candidates.items()})
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores = {f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = float(Meteor().compute_score(refs, hyps)[0])  # its Java process ends with the object
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    return scores


def distinct_ratio(captions: Sequence[str]) -> float:
    """Distinct captions / images: low values mean the model collapsed to a few generic captions."""
    return len(set(captions)) / max(1, len(captions))


def format_metrics(scores: dict[str, float]) -> str:
    return "  ".join(f"{name} {scores[name]:.3f}" for name in METRICS if name in scores)
