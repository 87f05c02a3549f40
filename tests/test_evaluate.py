"""Caption metrics against hand-computed BLEU and pycocoevalcap's own scorers; the evaluation command."""

import importlib.util
import json
import math
import shutil

import pytest
from conftest import ROOT, int8_encoder

import evaluate
import metrics
import precision

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")


@needs_java
def test_bleu_matches_a_hand_computation_at_corpus_level():
    references = {"a": ["A dog runs on the grass."], "b": ["a cat sits on a red chair"]}
    candidates = {"a": "a dog runs", "b": "a cat sits on a red chair"}
    scores = metrics.score_captions(references, candidates)
    # Clipped unigram matches 3 + 7 of 10 candidate words; brevity penalty exp(1 - 13/10) over the whole corpus.
    # (Averaging per-image BLEU would give (exp(-1) + 1) / 2 = 0.684 instead.)
    assert scores["BLEU-1"] == pytest.approx(math.exp(1 - 13 / 10), abs=1e-6)
    # Bigrams: 2 + 6 of 8 match, so precision 1 and BLEU-2 = sqrt(1 * 1) * the same penalty.
    assert scores["BLEU-2"] == pytest.approx(math.exp(1 - 13 / 10), abs=1e-6)
    perfect = metrics.score_captions({"x": ["a man rides a horse"]}, {"x": "a man rides a horse"})
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)


@needs_java
def test_scores_equal_pycocoevalcaps_scorers_called_directly():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {
        "1": ["a dog runs through the grass", "a brown dog is running"],
        "2": ["two children play in the water", "kids splash in a pool"],
        "3": ["a man rides a bike", "a cyclist on a street"],
    }
    candidates = {"1": "a dog running on grass", "2": "children playing in water", "3": "a man on a bike"}
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    hyps = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    scores = metrics.score_captions(references, candidates)
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(refs, hyps)[0])
    assert scores["METEOR"] == pytest.approx(Meteor().compute_score(refs, hyps)[0])
    assert set(scores) == set(metrics.METRICS)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="same images"):
        metrics.score_captions({"a": ["x"]}, {"b": "x"})
    with pytest.raises(ValueError, match="no captions"):
        metrics.score_captions({}, {})


def test_missing_java_names_what_to_install(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(metrics.JavaMissingError, match="apt-get install default-jre-headless"):
        metrics.require_java()


@needs_java
@pytest.mark.slow
def test_evaluate_command_scores_a_split_and_records_the_metrics(tmp_path, captioning_model, tiny_tokenizer, capsys):
    from checkpoint import load_model_file, save_captioner

    for name in ("cat.jpg", "coffee.jpg"):
        (tmp_path / "data" / "test").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "examples" / name, tmp_path / "data" / "test" / name)
        (tmp_path / "data" / "test" / name).with_suffix(".txt").write_text("a photo\nsomething\n")
    (tmp_path / "data" / "test" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "data" / "test" / "broken.txt").write_text("a broken photo\n")
    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer)
    argv = ["--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data"), "--split", "test"]
    argv += ["--strategy", "greedy", "--max-new-tokens", "5", "--output", str(tmp_path / "out.jsonl"), "--record"]
    assert evaluate.main(argv) == 0
    printed, warned = capsys.readouterr()
    assert "test: 2 images" in printed and "CIDEr" in printed and "distinct captions" in printed
    assert "warning: 1 unreadable image(s) skipped, e.g. " in warned and "broken.jpg" in warned
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(row["image"] for row in rows) == ["cat.jpg", "coffee.jpg"]
    metadata = load_model_file(tmp_path / "model.pt")[2]
    assert metadata["metrics_split"] == "test" and set(metadata["metrics"]) == set(metrics.METRICS)
    assert (
        evaluate.main(["--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data"), "--split", "val"]) == 2
    )
    assert "no 'val' split" in capsys.readouterr().err
    sweep = ["sweep", *argv[:6], "--strategy", "beam", "--max-new-tokens", "5", "num_beams=1,2", "length_penalty=1,2"]
    assert evaluate.main(sweep) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("num_beams=")]
    settings = [line.split(":")[0] for line in lines]
    assert settings == [f"num_beams={b} length_penalty={p}" for b in (1, 2) for p in (1.0, 2.0)], lines
    assert all("CIDEr" in line and "distinct" in line for line in lines)


@needs_java
@pytest.mark.slow
@pytest.mark.parametrize("native", [None, "bfloat16"])
def test_choose_precision_records_the_faster_precision_only_when_it_scores_like_float32(
    tmp_path, captioning_model, tiny_tokenizer, monkeypatch, capsys, native
):
    import openvino_runtime
    import precision
    from checkpoint import load_model_file, save_captioner

    (tmp_path / "data" / "test").mkdir(parents=True)
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(ROOT / "examples" / name, tmp_path / "data" / "test" / name)
        (tmp_path / "data" / "test" / name).with_suffix(".txt").write_text("a photo\nsomething\n")
    metadata = {"precision": "bfloat16"}
    carries_int8_encoder = native and openvino_runtime.available() and importlib.util.find_spec("nncf") is not None
    if carries_int8_encoder:  # scored only where the file carries it
        metadata["int8_encoder"] = int8_encoder(captioning_model, [ROOT / "examples" / "cat.jpg"])
    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer, metadata)
    # the CPU's report, simulated
    flags = frozenset({"avx2", "avx512f"}) | ({"avx512_bf16", "avx512_vnni"} if native else set())
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    argv = ["--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data"), "--strategy", "greedy"]
    before = (tmp_path / "model.pt").read_bytes()
    assert evaluate.main(["precision", *argv, "--max-new-tokens", "6"]) == 0
    assert (tmp_path / "model.pt").read_bytes() == before  # nothing rewrites a model file without --record
    assert "qualifying (--record writes it into the model file) precision:" in capsys.readouterr().out
    assert evaluate.main(["precision", *argv, "--max-new-tokens", "6", "--record"]) == 0
    metadata = load_model_file(tmp_path / "model.pt")[2]
    scores = metadata["precision_scores"]
    openvino = {"openvino-float32"} | ({"openvino-bfloat16", "openvino-bfloat16-int8"} if native else set())
    openvino |= {"openvino-int8-encoder"} if carries_int8_encoder else set()
    expected_settings = {"float32", "int8"} | ({native, "bfloat16-int8"} if native else set())
    assert set(scores) == expected_settings | (openvino if openvino_runtime.available() else set())

    def close(name: str) -> bool:  # one-sided: scoring above float32 never refuses a precision
        return all(scores["float32"][metric] - scores[name][metric] <= 0.01 for metric in ("CIDEr", "BLEU-4"))

    expected = [name for name in precision.SPEED_ORDER if name in scores and close(name)]
    assert metadata["precisions"] == expected and metadata["precision"] == expected[0]
    assert metadata["metrics"] == scores["float32"] and metadata["metrics_split"] == "test"  # the model's scores
    recorded_command = "python evaluate.py precision " + " ".join(argv) + " --max-new-tokens 6 --record"
    assert metadata["metrics_command"] == recorded_command
    assert f"recorded precision: {expected[0]} (at most 0.01 below float32, fastest first: {', '.join(expected)})" in (
        capsys.readouterr().out
    )


def test_a_precision_qualifies_when_at_most_0_01_below_float32_and_scoring_higher_never_refuses_it():
    float32 = {"CIDEr": 0.643, "BLEU-4": 0.258}
    scores = {
        "float32": float32,
        "bfloat16-int8": {"CIDEr": 0.661, "BLEU-4": 0.262},  # higher by more than 0.01: still qualifies
        "bfloat16": {"CIDEr": 0.634, "BLEU-4": 0.250},  # 0.009 and 0.008 below
        "int8": {"CIDEr": 0.632, "BLEU-4": 0.258},  # 0.011 below on CIDEr
    }
    assert precision.qualifying_precisions(scores) == ["bfloat16-int8", "bfloat16", "float32"]
    # A model file's recorded scores are judged by the rule itself, so `auto` follows it for files made before it.
    from release import ModelInfo

    recorded = ModelInfo(precision_scores=scores, precisions=("bfloat16", "float32"), precision="bfloat16")
    assert precision.accepted_precisions(recorded) == ["bfloat16-int8", "bfloat16", "float32"]
    assert precision.accepted_precisions(ModelInfo(precision="bfloat16")) == ["bfloat16"]
