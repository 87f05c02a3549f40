"""labels.py: ImageNet labels for every photo, checked against the teacher network run independently, and carried
through the Python API, caption.py's outputs (JSONL, CSV, --labels-only, --keywords) and the app's details."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import caption
from app import _details, summary
from captioner import Captioner
from checkpoint import save_captioner
from config import DecodeConfig
from distill import TEACHER_TRANSFORM, load_teacher
from embed import read_keywords
from images import load_image
from labels import class_names

SHIPPED = ROOT / "captioner.pt"
EXAMPLES = ("cat.jpg", "coffee.jpg", "rocket.jpg")
# A correct ImageNet class for each example photo (ImageNet has no "rocket": its missile and space shuttle are).
CORRECT = {"cat.jpg": {"Egyptian cat", "tabby", "tiger cat"}, "coffee.jpg": {"espresso", "cup", "coffee mug"},
           "rocket.jpg": {"missile", "space shuttle", "projectile"}}  # fmt: skip


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load(SHIPPED, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def recogniser_state():
    return {name: tensor.half() for name, tensor in load_teacher().state_dict().items()}


@pytest.fixture(scope="module")
def labelled_model_file(tmp_path_factory, captioning_model, tiny_tokenizer, recogniser_state):
    """The tiny 32-pixel captioning model with the real recogniser: labels come from the photo at 224 pixels."""
    path = tmp_path_factory.mktemp("model") / "labelled.pt"
    save_captioner(path, captioning_model, tiny_tokenizer, {"recogniser": recogniser_state})
    return path


def test_the_example_photos_get_a_correct_label_in_their_top_three(shipped):
    captions = shipped.caption([ROOT / "examples" / name for name in EXAMPLES])
    for name, result in zip(EXAMPLES, captions, strict=True):
        assert len(result.labels) == 5 and result.labels[0].probability >= result.labels[-1].probability
        assert CORRECT[name] & {label.name for label in result.labels[:3]}, (name, result.labels)


def test_labels_are_the_teachers_run_independently(shipped):
    photos = sorted((ROOT / "examples").glob("*.jpg"))
    teacher = load_teacher()
    with torch.inference_mode():
        expected = teacher(TEACHER_TRANSFORM([load_image(photo) for photo in photos])).softmax(dim=-1)
    found = shipped.labels(photos)
    names = class_names()
    for row, labels in zip(expected, found, strict=True):
        top = row.topk(5)
        assert [label.name for label in labels][:1] == [names[int(top.indices[0])]]  # top-1 agrees on every photo
        # float16 weights: each rank's probability within a hundredth (names repeat in ImageNet: two "crane"s)
        assert [label.probability for label in labels] == pytest.approx(top.values.tolist(), abs=0.01)


def test_labels_reach_jsonl_csv_and_the_apps_details(labelled_model_file, tmp_path, capsys):
    photo = ROOT / "examples" / "coffee.jpg"
    assert caption.main(["--model", str(labelled_model_file), "--format", "jsonl", str(photo)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["labels"][0] == {"label": "espresso", "probability": pytest.approx(0.89, abs=0.01)}
    assert len(row["labels"]) == 5 and set(row["labels"][0]) == {"label", "probability"}
    assert caption.main(["--model", str(labelled_model_file), "--format", "csv", str(photo)]) == 0
    [csv_row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert csv_row["labels"].startswith("espresso (0.89); cup (0.0")
    captioner = Captioner.load(labelled_model_file, device="cpu")
    [result] = captioner.caption([photo])
    details = _details(result, captioner.default_config())
    assert details["labels"] == row["labels"]
    assert "ImageNet labels: espresso (89%)" in summary(result)


def test_labels_only_tags_photos_without_captioning_them(labelled_model_file, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "examples" / "cat.jpg", folder / "cat.jpg")
    (folder / "broken.jpg").write_bytes(b"not an image")
    status = caption.main(["--model", str(labelled_model_file), "--labels-only", "--format", "jsonl", str(folder)])
    output = capsys.readouterr()
    assert status == 1 and "broken.jpg: not an image format" in output.err
    [row] = [json.loads(line) for line in output.out.splitlines()]
    assert set(row) == {"image", "labels"} and row["labels"][0]["label"] == "Egyptian cat"
    assert caption.main(["--model", str(labelled_model_file), "--labels-only", str(folder / "cat.jpg")]) == 0
    assert capsys.readouterr().out.startswith(f"{folder / 'cat.jpg'}\tEgyptian cat (0.80); tiger cat (0.08)")


def test_keywords_go_into_sidecars_xmp_and_iptc_and_leave_the_pixels_alone(labelled_model_file, tmp_path, capsys):
    photo = tmp_path / "cat.jpg"
    shutil.copy(ROOT / "examples" / "cat.jpg", photo)
    pixels = np.asarray(Image.open(photo))
    flags = ["--model", str(labelled_model_file), "--keywords", "--max-new-tokens", "4"]
    assert caption.main([*flags, "--embed", "--sidecar", str(photo)]) == 0
    assert read_keywords(photo) == ["Egyptian cat"]  # the labels at least 10% probable: tiger cat is 8%
    import pyexiv2

    assert pyexiv2.Image(str(photo)).read_iptc()["Iptc.Application2.Keywords"] == ["Egyptian cat"]
    assert np.array_equal(np.asarray(Image.open(photo)), pixels)
    assert photo.with_suffix(".txt").read_text().rstrip("\n").endswith(", Egyptian cat")


def test_a_model_file_without_a_recogniser_loads_and_its_labels_are_empty(model_file, tmp_path, capsys):
    captioner = Captioner.load(model_file, device="cpu")
    assert captioner.recogniser is None
    [result] = captioner.caption([ROOT / "examples" / "cat.jpg"], DecodeConfig(max_new_tokens=4))
    assert result.labels == ()
    photo = str(ROOT / "examples" / "cat.jpg")
    assert caption.main(["--model", str(model_file), "--format", "jsonl", "--max-new-tokens", "4", photo]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == []
    assert caption.main(["--model", str(model_file), "--labels-only", photo]) == 2
    assert capsys.readouterr().err.strip().endswith("has no ImageNet recogniser for labels (hub.py release --labels)")
    with pytest.raises(SystemExit):
        caption.main(["--model", str(model_file), "--keywords", photo])
    assert "--keywords adds labels to --sidecar files or --embed metadata" in capsys.readouterr().err
