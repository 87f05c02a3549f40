"""Pretrained weights from outside: a timm ViT for the encoder, a GPT-2 for the decoder (litgpt's convert step).

Each source has one loader with an explicit name map. When a loader finishes, every tensor of the part it fills is
either loaded or on a named list of new ones; anything else (an unknown source tensor, a shape that does not fit, a
gap) raises ValueError, so a bad load fails at load time instead of quietly training from noise. Hub ids and local
folders or files go through the same code path (timm's and transformers' own loaders read them).

    model = from_parts("vit_small_patch14_dinov2", None, encoder_weights="dinov2/model.safetensors", ...)
    reference = to_gpt2(model, bos_token_id=..., eos_token_id=...)   # transformers' GPT-2 on our weights
"""

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from config import PRESETS, ModelConfig
from model import CaptionModel

# isort: split
import timm  # after model, whose import of torchvision_fix must come first

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """What a loader did with each tensor of the model part it filled."""

    source: str
    loaded: tuple[str, ...]  # our names, copied from the source
    initialised: tuple[str, ...]  # our names the source does not have, on the loader's list of new tensors
    skipped: tuple[str, ...]  # source names deliberately not copied (tied weights, buffers)

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.initialised)} newly initialised, "
            f"{len(self.skipped)} skipped (tied or buffers)"
        )


def from_parts(
    encoder: str,
    decoder: str | os.PathLike | None,
    *,
    encoder_pretrained: bool,
    encoder_weights: str | os.PathLike | None = None,
    image_size: int = 224,
    base: ModelConfig | None = None,
    vocab_size: int | None = None,
) -> CaptionModel:
    """Assemble a model from a timm encoder and a GPT-2 decoder.

    Args:
        encoder: a timm VisionTransformer name.
        decoder: a GPT-2 hub id or a local directory saved with `save_pretrained`, whose sizes and weights
            (cross-attention included, when present) are loaded; None for a fresh decoder sized like `base`.
        encoder_pretrained: load the encoder's pretrained weights from the hub through timm.
        encoder_weights: a local `.safetensors`/`.pth` state dict for the encoder instead of the hub.
        image_size: input resolution; position embeddings are resampled to it.
        base: decoder sizes and dropout for a fresh decoder (default: the `small` preset).
        vocab_size: the fresh decoder's vocabulary size (that of its tokenizer).
    """
    config = dataclasses.replace(base or PRESETS["small"], encoder=encoder, image_size=image_size)
    gpt2 = None
    if decoder is not None:
        gpt2 = _load_gpt2_checkpoint(decoder)
        config = dataclasses.replace(config, **_gpt2_sizes(gpt2.config))
    elif vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    model = CaptionModel(config)
    reports = []
    if encoder_pretrained or encoder_weights is not None:
        reports.append(load_timm_weights(model, encoder_weights))
    if gpt2 is not None:
        reports.append(load_gpt2_weights(model, gpt2.state_dict(), os.fspath(decoder)))
    new_parts = {"bridge": model.bridge}
    if not (encoder_pretrained or encoder_weights is not None):
        new_parts["encoder"] = model.encoder
    if gpt2 is None:
        new_parts["decoder"] = model.decoder
    new = {f"{part}.{name}" for part, module in new_parts.items() for name in module.state_dict()}
    new |= {name for report in reports for name in report.initialised}
    loaded = {name for report in reports for name in report.loaded}
    unaccounted = [name for name in model.state_dict() if name not in loaded | new]
    if unaccounted:
        raise ValueError(f"neither loaded nor new: {', '.join(unaccounted[:5])}")
    for report in reports:
        logger.info("%s", report.summary())
    logger.info("newly initialised: %s", ", ".join(new_parts))
    return model


# ---- the encoder: timm's VisionTransformer names, under our `encoder.vit.` ----

_TIMM_PREFIX = "encoder.vit."  # the encoder wraps the timm model unchanged, so every name maps with this prefix


def load_timm_weights(model: CaptionModel, weights_file: str | os.PathLike | None = None) -> LoadReport:
    """Load the encoder's pretrained timm weights: the hub's (`weights_file` None) or a local state dict file.

    timm's own loader reads them (dropping the classifier and resampling the position embedding to the model's
    image size), into a model of the same architecture; its state dict is then copied name by name.
    """
    name, size = model.config.encoder, model.config.image_size
    options = {} if weights_file is None else {"pretrained_cfg_overlay": {"file": os.fspath(weights_file)}}
    source = timm.create_model(name, pretrained=True, num_classes=0, img_size=size, **options)
    label = f"the hub's {name}" if weights_file is None else os.fspath(weights_file)
    return load_encoder_state(model, source.state_dict(), label)


def load_encoder_state(model: CaptionModel, state: dict[str, Tensor], source: str = "state dict") -> LoadReport:
    """Copy a timm VisionTransformer state dict into `model.encoder`; every encoder tensor must be in it."""
    ours = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if name.startswith(_TIMM_PREFIX)}
    unknown = sorted(set(state) - {name.removeprefix(_TIMM_PREFIX) for name in ours})
    if unknown:
        raise ValueError(f"{source}: tensors the encoder does not have: {', '.join(unknown[:5])}")
    missing = sorted(name for name in ours if name.removeprefix(_TIMM_PREFIX) not in state)
    if missing:
        raise ValueError(f"{source}: lacks encoder tensors: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, target in ours.items():
            value = state[name.removeprefix(_TIMM_PREFIX)]
            if value.shape != target.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
            target.copy_(value)
    return LoadReport(source, tuple(ours), (), ())


# ---- the decoder: transformers' GPT2LMHeadModel names <-> ours ----

# "{}" is the layer index. None marks tensors deliberately not copied.
_GPT2_NAMES: dict[str, str | None] = {
    "transformer.wte.weight": "decoder.wte.weight",
    "transformer.wpe.weight": "decoder.wpe.weight",
    "transformer.ln_f.weight": "decoder.ln_f.weight",
    "transformer.ln_f.bias": "decoder.ln_f.bias",
    "lm_head.weight": None,  # tied to wte; checked equal on load
}
_GPT2_LAYER_NAMES: dict[str, str | None] = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.c_attn.weight": "attn.c_attn.weight",
    "attn.c_attn.bias": "attn.c_attn.bias",
    "attn.c_proj.weight": "attn.c_proj.weight",
    "attn.c_proj.bias": "attn.c_proj.bias",
    "attn.bias": None,  # causal-mask buffer of older transformers versions
    "attn.masked_bias": None,
    "ln_cross_attn.weight": "ln_cross.weight",
    "ln_cross_attn.bias": "ln_cross.bias",
    "crossattention.q_attn.weight": "cross_attn.q_attn.weight",
    "crossattention.q_attn.bias": "cross_attn.q_attn.bias",
    "crossattention.c_attn.weight": "cross_attn.c_attn.weight",
    "crossattention.c_attn.bias": "cross_attn.c_attn.bias",
    "crossattention.c_proj.weight": "cross_attn.c_proj.weight",
    "crossattention.c_proj.bias": "cross_attn.c_proj.bias",
    "crossattention.bias": None,
    "crossattention.masked_bias": None,
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight",
    "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight",
    "mlp.c_proj.bias": "mlp.c_proj.bias",
}
# GPT-2's Conv1D stores weights as (in, out); nn.Linear as (out, in).
_GPT2_CONV1D = frozenset(
    {
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "crossattention.q_attn.weight",
        "crossattention.c_attn.weight",
        "crossattention.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    }
)
# The GPT-2 layer tensors that exist only where the checkpoint was made with add_cross_attention=True.
_GPT2_CROSS_ATTENTION = frozenset(
    name for name in _GPT2_LAYER_NAMES if name.startswith(("ln_cross_attn.", "crossattention."))
)


def _gpt2_name_map(n_layer: int) -> dict[str, tuple[str | None, bool]]:
    """GPT-2 name -> (our name or None, whether the tensor is transposed), for every layer."""
    names = {source: (target, False) for source, target in _GPT2_NAMES.items()}
    for layer in range(n_layer):
        for source, target in _GPT2_LAYER_NAMES.items():
            ours = None if target is None else f"decoder.h.{layer}.{target}"
            names[f"transformer.h.{layer}.{source}"] = (ours, source in _GPT2_CONV1D)
    return names


def load_gpt2_weights(model: CaptionModel, gpt2_state: dict[str, Tensor], source: str = "GPT-2") -> LoadReport:
    """Copy a transformers GPT2LMHeadModel state dict into `model`'s decoder.

    Every decoder tensor must be loaded, or be a cross-attention tensor absent from the source (then it keeps its
    fresh initialisation). Unknown source tensors, shape mismatches and missing tensors raise ValueError.
    """
    names = _gpt2_name_map(model.config.n_layer)
    unknown = sorted(set(gpt2_state) - set(names))
    if unknown:
        raise ValueError(f"unexpected tensors in the GPT-2 checkpoint: {', '.join(unknown[:5])}")
    ours = dict(model.named_parameters())
    loaded, skipped = [], []
    with torch.no_grad():
        for source, tensor in gpt2_state.items():
            target, transposed = names[source]
            if target is None:
                skipped.append(source)
                continue
            value = tensor.t() if transposed else tensor
            if value.shape != ours[target].shape:
                expected = tuple(ours[target].shape)
                raise ValueError(f"{source}: shape {tuple(value.shape)} does not fit {target} {expected}")
            ours[target].copy_(value)
            loaded.append(target)
    if "lm_head.weight" in gpt2_state and not torch.equal(gpt2_state["lm_head.weight"], ours["decoder.wte.weight"]):
        raise ValueError("the GPT-2 checkpoint's lm_head is not tied to its token embedding")
    cross_attention = {
        target for source, (target, _) in names.items() if source.split(".", 3)[-1] in _GPT2_CROSS_ATTENTION
    }
    not_loaded = sorted(name for name in ours if name.startswith("decoder.") and name not in loaded)
    unexpected_gaps = [name for name in not_loaded if name not in cross_attention]
    if unexpected_gaps:
        raise ValueError(f"the GPT-2 checkpoint lacks tensors: {', '.join(unexpected_gaps[:5])}")
    return LoadReport(source, tuple(loaded), tuple(not_loaded), tuple(skipped))


def gpt2_state_dict(model: CaptionModel) -> dict[str, Tensor]:
    """The decoder's weights under transformers' GPT2LMHeadModel(add_cross_attention=True) names."""
    ours = dict(model.named_parameters())
    state = {}
    for source, (target, transposed) in _gpt2_name_map(model.config.n_layer).items():
        if target is not None:
            state[source] = ours[target].detach().t() if transposed else ours[target].detach()
    state["lm_head.weight"] = ours["decoder.wte.weight"].detach()
    return state


def to_gpt2(model: CaptionModel, *, bos_token_id: int, eos_token_id: int):
    """A transformers GPT2LMHeadModel(add_cross_attention=True) with the decoder's weights: what
    VisionEncoderDecoderModel runs, for side-by-side comparison. It takes `model.encode`'s tokens as
    `encoder_hidden_states`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_epsilon, add_cross_attention=True, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )  # fmt: skip
    reference = GPT2LMHeadModel(config).eval()
    reference.load_state_dict(gpt2_state_dict(model), strict=True)
    return reference


def _load_gpt2_checkpoint(source: str | os.PathLike):
    """A transformers GPT2LMHeadModel from a hub id or a local `save_pretrained` directory (one code path)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(os.fspath(source))


def _gpt2_sizes(gpt2_config) -> dict:
    """Our config fields from a transformers GPT2Config, refusing variants our blocks do not implement."""
    if gpt2_config.activation_function != "gelu_new":
        raise ValueError(f"GPT-2 activation {gpt2_config.activation_function!r} is not supported (gelu_new only)")
    if not gpt2_config.scale_attn_weights or gpt2_config.scale_attn_by_inverse_layer_idx:
        raise ValueError("GPT-2 attention scaling other than 1/sqrt(head size) is not supported")
    return {
        "n_layer": gpt2_config.n_layer,
        "n_head": gpt2_config.n_head,
        "n_embd": gpt2_config.n_embd,
        "vocab_size": gpt2_config.vocab_size,
        "n_positions": gpt2_config.n_positions,
        "layer_norm_epsilon": gpt2_config.layer_norm_epsilon,
        "dropout": gpt2_config.resid_pdrop,
    }
