"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap, on its 0-1 scale; and CIDEr-D in
process (`CiderD`), fast enough to be a training reward.

Scores are computed in one call over the whole split (never averaged over batches). METEOR and the PTB tokenizer run
on Java; SPICE is left out (it needs downloads that do not work offline).
"""

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

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


# ---- CIDEr-D in-process, for training rewards: the same numbers as pycocoevalcap's Cider, without Java ----

# What pycocoevalcap's PTBTokenizer (Stanford's, lower-casing) does to caption text, for the characters captions
# have: clitics split off ("dog's" -> "dog 's", "isn't" -> "is n't"); hyphens, periods, colons and commas inside a
# word or number kept ("t-shirt", "3.5", "10,000"); brackets renamed; then punctuation tokens removed.
_PTB_TOKEN = re.compile(r"\.\.\.|--|\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.:,/]\w+)*|[^\w\s]", re.IGNORECASE)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_PTB_PUNCTUATION = frozenset({'"', "''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})


def ptb_tokenize(text: str) -> str:
    """Lower-cased words separated by single spaces, punctuation dropped: what pycocoevalcap's PTBTokenizer makes of
    an English caption ("A dog's ball." -> "a dog 's ball"), in Python."""
    tokens = (_PTB_BRACKETS.get(token, token) for token in _PTB_TOKEN.findall(text.lower()))
    return " ".join(token for token in tokens if token not in _PTB_PUNCTUATION)


def _ngrams(text: str, n: int) -> Counter:
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


@dataclass(frozen=True)
class _Vector:
    weights: tuple[dict, ...]  # per n-gram order: n-gram -> tf * idf
    norms: tuple[float, ...]
    length: int  # pycocoevalcap counts the bigrams here, not the words; kept so that the scores agree


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, as pycocoevalcap computes it: clipped tf-idf n-gram cosine, Gaussian length
    penalty with sigma 6, times 10) against fixed document frequencies.

    Build it once from a corpus's references (e.g. every training image's five captions); score candidates against
    any references. Texts must already be tokenised (`ptb_tokenize`). Built from exactly the references being
    scored, it equals pycocoevalcap's `Cider().compute_score`.
    """

    def __init__(self, corpus: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for references in corpus:
            self.document_frequency.update({gram for text in references for gram in _ngrams(text, n)})
        self.log_documents = math.log(float(len(corpus)))

    def vector(self, text: str) -> _Vector:
        weights: list[dict] = [{} for _ in range(self.n)]
        norms = [0.0] * self.n
        length = 0
        for gram, count in _ngrams(text, self.n).items():
            order = len(gram) - 1
            weight = count * (self.log_documents - math.log(max(1.0, self.document_frequency[gram])))
            weights[order][gram] = weight
            norms[order] += weight * weight
            length += count if order == 1 else 0
        return _Vector(tuple(weights), tuple(math.sqrt(norm) for norm in norms), length)

    def score(self, candidate: str | _Vector, references: Sequence[str | _Vector]) -> float:
        """CIDEr-D of one tokenised candidate against its references (texts, or `vector`s made once)."""
        hypothesis = self.vector(candidate) if isinstance(candidate, str) else candidate
        total = 0.0
        for reference in references:
            reference = self.vector(reference) if isinstance(reference, str) else reference
            penalty = math.exp(-((hypothesis.length - reference.length) ** 2) / (2 * self.sigma**2))
            for order in range(self.n):
                ours, theirs = hypothesis.weights[order], reference.weights[order]
                overlap = sum(
                    min(weight, theirs.get(gram, 0.0)) * theirs.get(gram, 0.0) for gram, weight in ours.items()
                )
                if hypothesis.norms[order] and reference.norms[order]:
                    overlap /= hypothesis.norms[order] * reference.norms[order]
                total += overlap * penalty
        return total / self.n / len(references) * 10.0
