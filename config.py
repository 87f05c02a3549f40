"""Configuration: frozen dataclasses for the model and for decoding, and the named model presets.

Every checkpoint stores ``dataclasses.asdict`` of its ``ModelConfig`` and is rebuilt from it, never from the
defaults written here. Variants are derived with ``dataclasses.replace``.
"""

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

ResumeRule = Literal["must_match", "may_change"]


def option(default: Any, help: str, on_resume: ResumeRule | None = None) -> Any:
    """A dataclass field with its command-line help (cli.add_arguments makes one flag per field). A training
    setting also says whether a resumed run may change it (`on_resume`): "must_match" where a change would alter
    what is being trained (its data, model, optimizer, schedule, randomness), "may_change" where it would not."""
    metadata = {"help": help} | ({"on_resume": on_resume} if on_resume else {})
    return field(default=default, metadata=metadata)


def _require(condition: bool, field: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ValueError(f"{field} must be {requirement}, got {value!r}")


def _require_positive_int(field: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value, "a positive integer")


def _require_finite(field: str, value: Any, low: float, high: float, requirement: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(ok and low <= value <= high, field, value, requirement)


INTERPOLATIONS = frozenset({"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"})

# Upper bounds of a model's shape, checked before any tensor is allocated: a model file (perhaps from the Hub) is
# refused in one line rather than allocating until memory runs out. Each admits GPT-2 XL (1600 wide, 48 layers,
# 25 heads, 50,257 tokens, 1,024 positions) with room to spare.
MODEL_LIMITS: dict[str, int] = {
    "image_size": 1024,
    "n_layer": 48,
    "n_head": 64,
    "n_embd": 2048,
    "vocab_size": 262_144,
    "n_positions": 4096,
    "image_pool": 64,
    "retrieval_tokens": 64,
}
# Fields added after model files were first released: a file without them gets these values (what it was built as).
ADDED_MODEL_FIELDS: dict[str, Any] = {"retrieval_k": 0, "retrieval_tokens": 16, "retrieval_reading": "memory"}
# How a retrieval model reads its neighbours' captions: beside the image tokens, through cross-attention, or as a
# text prompt before the caption, through self-attention (read, never predicted).
RETRIEVAL_READINGS = ("memory", "prompt")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A ViT image encoder feeding a GPT-2 decoder with cross-attention in every layer.

    The image-normalisation fields default to ``None``, meaning "the encoder's own timm data config";
    ``CaptionModel`` fills them in, so a saved checkpoint always carries concrete values.
    """

    encoder: str = "vit_small_patch14_dinov2"  # any timm VisionTransformer name
    image_size: int = 224
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 4096
    n_positions: int = 64  # the longest token sequence the decoder sees, BOS included
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    image_interpolation: str | None = None  # a PIL resampling filter name: "bicubic", "bilinear", ...
    image_pool: int = 1  # the decoder sees the patch grid average-pooled by this factor (class tokens kept)
    retrieval_k: int = 0  # the decoder also reads the captions of this many nearest photos (retrieval.py); 0: none
    retrieval_tokens: int = 16  # tokens kept of each of those captions, EOS included
    retrieval_reading: str = "memory"  # one of RETRIEVAL_READINGS

    def __post_init__(self) -> None:
        _require(isinstance(self.encoder, str) and bool(self.encoder), "encoder", self.encoder, "a timm model name")
        for name, limit in MODEL_LIMITS.items():
            value = getattr(self, name)
            _require_positive_int(name, value)
            _require(value <= limit, name, value, f"at most {limit}")
        retrieval_ok = isinstance(self.retrieval_k, int) and not isinstance(self.retrieval_k, bool)
        _require(
            retrieval_ok and 0 <= self.retrieval_k <= 16, "retrieval_k", self.retrieval_k, "a whole number in [0, 16]"
        )
        _require(
            self.retrieval_reading in RETRIEVAL_READINGS, "retrieval_reading", self.retrieval_reading,
            f"one of {', '.join(RETRIEVAL_READINGS)}",
        )  # fmt: skip
        _require(self.n_positions >= 2, "n_positions", self.n_positions, "at least 2 (BOS and one token)")
        _require(self.n_embd % self.n_head == 0, "n_embd", self.n_embd, f"divisible by n_head={self.n_head}")
        _require_finite("dropout", self.dropout, 0.0, 0.99, "in [0, 0.99]")
        _require_finite("layer_norm_epsilon", self.layer_norm_epsilon, 1e-12, 1.0, "in [1e-12, 1]")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                _require(len(getattr(self, name)) == 3, name, value, "three numbers (R, G, B)")
        if self.image_std is not None:
            _require(all(v > 0 for v in self.image_std), "image_std", self.image_std, "positive")
        if self.image_interpolation is not None:
            _require(
                self.image_interpolation in INTERPOLATIONS,
                "image_interpolation",
                self.image_interpolation,
                f"one of {sorted(INTERPOLATIONS)}",
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config saved with ``asdict``; unknown or missing fields are an error, not a silent default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        missing = sorted(known - set(values) - set(ADDED_MODEL_FIELDS))
        if missing:
            raise ValueError(f"model config is missing fields: {', '.join(missing)}")
        return cls(**(ADDED_MODEL_FIELDS | values))


PRESETS: dict[str, ModelConfig] = {
    # For tests: builds and runs a forward pass in milliseconds.
    "tiny": ModelConfig(
        encoder="vit_tiny_patch16_224",
        image_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=300,
        n_positions=24,
        dropout=0.0,
    ),
    # The shipped default: DINOv2 ViT-S/14 at 224 px; its 16x16 patch grid pooled to 8x8 (+ class token = 65
    # image tokens) for a caption-sized decoder.
    "small": ModelConfig(image_pool=2),
    # The same encoder and image tokens with a wider decoder (8 heads of 64): +14% val CIDEr after 2 epochs in
    # the decoder trial in docs/experiments.md, for about 17% more training time.
    "small-wide": ModelConfig(image_pool=2, n_embd=512, n_head=8),
    # The classic design: ViT-B/16 and GPT-2 124M, for users who can download both from the hub.
    "vit-gpt2": ModelConfig(
        encoder="vit_base_patch16_224",
        image_size=224,
        n_layer=12,
        n_head=12,
        n_embd=768,
        vocab_size=50257,
        n_positions=1024,
        dropout=0.1,
    ),
}

Strategy = Literal["beam", "greedy", "sample"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)


# The accepted range of each numeric decoding option; the app's controls take their ranges from here too.
DECODE_LIMITS: dict[str, tuple[float, float]] = {
    "num_beams": (1, 16),
    "num_return_sequences": (1, 16),
    "max_new_tokens": (1, 256),
    "min_new_tokens": (0, 256),
    "no_repeat_ngram_size": (0, 256),
    "top_k": (0, 1_000_000),
    "length_penalty": (-10.0, 10.0),
    "repetition_penalty": (0.01, 100.0),
    "temperature": (0.01, 100.0),
    "top_p": (0.0, 1.0),
}


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """How to turn image tokens into a caption. The defaults are the shipped model's default decoding."""

    strategy: Strategy = option("beam", "beam search, greedy, or sampling")
    num_beams: int = option(3, "beams kept at each step (beam search)")
    length_penalty: float = option(1.0, "beam scores are divided by length ** this (higher: longer captions)")
    early_stopping: bool = option(True, "stop beam search once num_beams captions have ended")
    num_return_sequences: int = option(1, "captions returned per image, best first")
    max_new_tokens: int = option(30, "the longest caption, in tokens")
    min_new_tokens: int = option(0, "the shortest caption, in tokens")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size (0: off)")
    repetition_penalty: float = option(1.0, "make tokens already used this much less likely (1: off)")
    temperature: float = option(1.0, "sampling temperature (higher: more varied)")
    top_k: int = option(0, "sample among the k most likely tokens (0: all)")
    top_p: float = option(1.0, "sample among the most likely tokens holding this much probability (1: all)")
    seed: int | None = option(None, "seed for sampling (empty: random)")
    prefix: str = option("", 'text the caption must continue, e.g. "a photo of"')

    def __post_init__(self) -> None:
        _require(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        for name in ("num_beams", "num_return_sequences", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size",
                     "top_k"):  # fmt: skip
            low, high = DECODE_LIMITS[name]
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            _require(ok, name, value, f"a whole number in [{low}, {high}]")
        for name in ("length_penalty", "repetition_penalty", "temperature", "top_p"):
            low, high = DECODE_LIMITS[name]
            _require_finite(name, getattr(self, name), low, high, f"a number in [{low}, {high}]")
        _require(self.top_p > 0, "top_p", self.top_p, "a number in (0, 1]")
        _require(isinstance(self.early_stopping, bool), "early_stopping", self.early_stopping, "true or false")
        limit = {"beam": self.num_beams, "greedy": 1, "sample": DECODE_LIMITS["num_return_sequences"][1]}[self.strategy]
        _require(
            self.num_return_sequences <= limit,
            "num_return_sequences",
            self.num_return_sequences,
            f"at most {limit} for {self.strategy}" + (" (num_beams)" if self.strategy == "beam" else ""),
        )
        _require(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            self.min_new_tokens,
            f"at most max_new_tokens={self.max_new_tokens}",
        )
        seed_ok = self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool))
        _require(seed_ok and (self.seed is None or 0 <= self.seed < 2**63), "seed", self.seed, "empty or 0..2**63-1")
        _require(isinstance(self.prefix, str), "prefix", self.prefix, "text")
        _require(len(self.prefix) <= 500, "prefix", f"{len(self.prefix)} characters", "at most 500 characters")
        _require(self.prefix.isprintable(), "prefix", self.prefix, "printable text without control characters")


# What training computes in (autocast), and what a released model may run in: the same, plus int8 weights.
TrainPrecision = Literal["auto", "float32", "bfloat16", "float16"]
TRAIN_PRECISIONS: tuple[str, ...] = typing.get_args(TrainPrecision)
Precision = Literal["auto", "float32", "bfloat16", "float16", "int8", "bfloat16-int8", "int8-encoder"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
# What runs a released model: PyTorch, or OpenVINO for the encoder and the decoding step (openvino_runtime.py).
Runtime = Literal["auto", "torch", "openvino"]
RUNTIMES: tuple[str, ...] = typing.get_args(Runtime)


Objective = Literal["cross_entropy", "scst"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything `train.py` does, one flag per field (`python train.py --help`)."""

    data: str = field(
        metadata={
            "help": "data set: a folder, a captions .csv or a COCO .json (see data.py)",
            "on_resume": "must_match",
        }
    )
    out_dir: str = option("runs/small", "where last.pt, best.pt, train.log and metrics.csv go", on_resume="may_change")
    train_splits: str = option(
        "train",
        "splits trained on, comma-separated: train,val for a final model once every choice is made",
        on_resume="must_match",
    )
    preset: str = option("small", f"model preset for a new model: {', '.join(PRESETS)}", on_resume="must_match")
    init_from: str = option(
        "", "a captioner file to fine-tune (its config and tokenizer are kept)", on_resume="may_change"
    )
    resume: bool = option(False, "continue out_dir/last.pt exactly where it stopped", on_resume="may_change")
    overwrite: bool = option(
        False, "start afresh in an out_dir that holds a run, replacing its files", on_resume="may_change"
    )
    val_fraction: float = option(
        0.1, "with no val split: this share of the photos (at least 10) held out, by name", on_resume="must_match"
    )
    mix_data: str = option(
        "",
        "a second data set mixed into training (e.g. the one --init-from learned from), to keep its world",
        on_resume="must_match",
    )
    mix_weight: float = option(
        4.0, "photos from --mix-data for each training photo of --data (0.5: half as many)", on_resume="must_match"
    )
    decoder: str = option(
        "", "a GPT-2 hub id or folder for the decoder (empty: from scratch, caption tokenizer)", on_resume="must_match"
    )
    vocab_size: int = option(0, "tokenizer size for a decoder from scratch (0: the preset's)", on_resume="must_match")
    encoder_weights: str = option(
        "", "a local encoder state dict (.safetensors/.pth), e.g. from ../shared/weights", on_resume="must_match"
    )
    encoder_pretrained: bool = option(False, "download the encoder's timm weights from the hub", on_resume="must_match")
    n_layer: int | None = option(None, "decoder blocks of a new model (empty: the preset's)", on_resume="must_match")
    n_head: int | None = option(
        None, "decoder attention heads of a new model (empty: the preset's)", on_resume="must_match"
    )
    n_embd: int | None = option(None, "decoder width of a new model (empty: the preset's)", on_resume="must_match")
    dropout: float | None = option(None, "dropout of a new model (empty: the preset's)", on_resume="must_match")
    image_size: int | None = option(
        None, "the encoder's input size in pixels (empty: preset's/--init-from's)", on_resume="must_match"
    )
    image_pool: int | None = option(
        None, "pool the decoder's patch grid by this (empty: preset's/--init-from's)", on_resume="must_match"
    )
    retrieval_k: int = option(
        0, "read the captions of the N nearest training photos (retrieval.py; 0: none)", on_resume="must_match"
    )
    retrieval_reading: str = option(
        "memory",
        "how a new retrieval model reads them: memory (cross-attention beside the image) or prompt (text before the "
        "caption)",
        on_resume="must_match",
    )
    unfreeze_blocks: int | None = option(
        None,
        "train the encoder's last N blocks (0: frozen; empty: 4 for a new model, 0 for a fine-tune)",
        on_resume="must_match",
    )
    unfreeze_epoch: int = option(
        0, "epoch from which those blocks train (the decoder trains alone before)", on_resume="must_match"
    )
    encoder_lr_scale: float = option(0.1, "encoder learning rate = lr x this", on_resume="must_match")
    cache_dir: str = option(
        "~/.cache/image-captioner/features", "cache of the frozen blocks' tokens (empty: none)", on_resume="may_change"
    )
    cache_blocks: int | None = option(
        None, "blocks before the cache point (empty: every frozen block)", on_resume="must_match"
    )
    epochs: int = option(10, "epochs of the learning-rate schedule", on_resume="must_match")
    max_steps: int = option(0, "stop after this many optimizer steps (0: all epochs)", on_resume="may_change")
    batch_size: int = option(32, "images per micro-batch per process", on_resume="must_match")
    captions_per_image: int | None = option(
        None,
        "captions trained per image per step (fewer are cycled; empty: 5, at most as many as the data has)",
        on_resume="must_match",
    )
    grad_accum: int = option(1, "micro-batches per optimizer step", on_resume="must_match")
    lr: float | None = option(
        None, "peak learning rate (AdamW; empty: 5e-4 for a new model, 1e-4 for a fine-tune)", on_resume="must_match"
    )
    min_lr: float = option(1e-5, "the cosine schedule's floor", on_resume="must_match")
    warmup_steps: int | None = option(
        None, "steps of linear warm-up (empty: 200, for a fine-tune at most a tenth of the run)", on_resume="must_match"
    )
    weight_decay: float = option(0.05, "AdamW weight decay of matrices (never biases or norms)", on_resume="must_match")
    beta1: float = option(0.9, "AdamW beta1", on_resume="must_match")
    beta2: float = option(0.98, "AdamW beta2", on_resume="must_match")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)", on_resume="must_match")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", on_resume="must_match")
    objective: Objective = option(
        "cross_entropy", "cross_entropy, or scst: self-critical CIDEr-D (use --init-from)", on_resume="must_match"
    )
    scst_samples: int = option(
        5, "captions sampled per image by scst, each baselined by the others' mean reward", on_resume="must_match"
    )
    distill: float = option(
        0.0,
        "weight of the ImageNet teacher's distillation loss (0: off; the teacher is in requirements-dev.txt)",
        on_resume="must_match",
    )
    distill_temperature: float = option(
        2.0, "temperature softening the teacher's and the head's distributions", on_resume="must_match"
    )
    flip: bool = option(
        True, "mirror training images at random (never those whose captions say left or right)", on_resume="must_match"
    )
    max_caption_tokens: int = option(40, "longer training captions are cut", on_resume="must_match")
    eval_every: int = option(
        1, "epochs between validations (0: never); the last epoch is always validated", on_resume="may_change"
    )
    eval_images: int = option(0, "validation images captioned for metrics each epoch (0: all)", on_resume="may_change")
    eval_beams: int = option(3, "beams of the validation captions", on_resume="may_change")
    log_every: int = option(20, "optimizer steps between log lines", on_resume="may_change")
    checkpoint_every: int = option(
        100, "optimizer steps between saves of last.pt within an epoch", on_resume="may_change"
    )
    keep_epochs: bool = option(
        False, "also keep each epoch's weights as epoch-N.pt, e.g. to average the last ones", on_resume="may_change"
    )
    seed: int = option(0, "seed of the model init and the data order", on_resume="must_match")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...", on_resume="may_change")
    precision: TrainPrecision = option(
        "auto", "autocast precision (auto: bfloat16 where native, float16 on older GPUs)", on_resume="may_change"
    )
    workers: int = option(4, "threads decoding images when they are not cached", on_resume="may_change")

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        """Each number in its range."""
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "max_caption_tokens",
            "eval_beams",
            "log_every",
            "checkpoint_every",
            "workers",
        ):
            _require_positive_int(name, getattr(self, name))
        if self.captions_per_image is not None:
            _require_positive_int("captions_per_image", self.captions_per_image)
        for name in ("vocab_size", "unfreeze_blocks", "unfreeze_epoch", "max_steps", "warmup_steps", "eval_every",
                     "eval_images"):  # fmt: skip
            value = getattr(self, name)
            if value is not None or name not in ("unfreeze_blocks", "warmup_steps"):
                _require(isinstance(value, int) and value >= 0, name, value, "a non-negative integer")
        if self.lr is not None:
            _require_finite("lr", self.lr, 1e-8, 1.0, "in [1e-8, 1]")
            _require_finite("min_lr", self.min_lr, 0.0, self.lr, f"in [0, lr={self.lr}]")
        _require_finite("val_fraction", self.val_fraction, 0.01, 0.5, "in [0.01, 0.5]")
        _require_finite("mix_weight", self.mix_weight, 0.01, 100.0, "in [0.01, 100]")
        _require_finite("encoder_lr_scale", self.encoder_lr_scale, 0.0, 10.0, "in [0, 10]")
        _require_finite("weight_decay", self.weight_decay, 0.0, 1.0, "in [0, 1]")
        _require_finite("beta1", self.beta1, 0.0, 0.9999, "in [0, 1)")
        _require_finite("beta2", self.beta2, 0.0, 0.9999, "in [0, 1)")
        _require_finite("grad_clip", self.grad_clip, 0.0, 1e6, "non-negative (0: no clipping)")
        _require_finite("label_smoothing", self.label_smoothing, 0.0, 0.5, "in [0, 0.5]")
        _require_finite("distill", self.distill, 0.0, 100.0, "in [0, 100]")
        _require_finite("distill_temperature", self.distill_temperature, 0.1, 100.0, "in [0.1, 100]")
        for name in ("image_size", "image_pool"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))

    def _check_choices(self) -> None:
        """Each named choice known, and the settings that exclude each other not set together."""
        _require(isinstance(self.data, str) and bool(self.data), "data", self.data, "a data set path")
        _require(self.preset in PRESETS, "preset", self.preset, f"one of {', '.join(PRESETS)}")
        _require(self.objective in typing.get_args(Objective), "objective", self.objective, "cross_entropy or scst")
        ok = isinstance(self.scst_samples, int) and 2 <= self.scst_samples <= 16
        _require(ok, "scst_samples", self.scst_samples, "a whole number in [2, 16] (each sample needs others)")
        _require(
            not (self.distill and self.objective != "cross_entropy"), "distill", self.distill,
            "0 with --objective scst (distillation goes with cross-entropy training)",
        )  # fmt: skip
        _require(
            isinstance(self.retrieval_k, int) and 0 <= self.retrieval_k <= 16, "retrieval_k", self.retrieval_k,
            "a whole number in [0, 16]",
        )  # fmt: skip
        _require(
            self.retrieval_reading in RETRIEVAL_READINGS, "retrieval_reading", self.retrieval_reading,
            f"one of {', '.join(RETRIEVAL_READINGS)}",
        )  # fmt: skip
        _require(
            not (self.retrieval_k and (self.distill or self.objective != "cross_entropy")), "retrieval_k",
            self.retrieval_k, "0 with --distill or --objective scst (retrieval trains with cross-entropy alone)",
        )  # fmt: skip
        splits = self.train_splits.split(",") if isinstance(self.train_splits, str) else []
        _require(
            bool(splits) and all(splits), "train_splits", self.train_splits, "split names, e.g. train or train,val"
        )
        _require(self.precision in TRAIN_PRECISIONS, "precision", self.precision, "/".join(TRAIN_PRECISIONS))
        _require(not (self.resume and self.init_from), "init_from", self.init_from, "empty when resuming")
        _require(not (self.resume and self.overwrite), "overwrite", self.overwrite, "off when resuming")
        if self.cache_blocks is not None:
            _require(
                isinstance(self.cache_blocks, int) and self.cache_blocks >= 1,
                "cache_blocks",
                self.cache_blocks,
                "at least 1",
            )
