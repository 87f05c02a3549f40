"""The files: the model file `captioner.pt`, the Hub layout `model.safetensors` + `config.json` + `tokenizer.json`,
and training checkpoints (a model file plus the optimizer, step, random state and history of the run).

A `.pt` file is a plain dict of tensors, strings and numbers, written atomically and read with
``torch.load(weights_only=True)``, which refuses any pickled object that could run code:

    {"format": "image-captioner", "format_version": 1, "config": asdict(ModelConfig),
     "tokenizer": <tokenizers JSON>, "state_dict": {...}, "metadata": {...}}

Every way a file can be wrong (missing, truncated, corrupt, foreign, from a newer version, not matching its config)
becomes one `CheckpointError` line naming the file and the problem.
"""

import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import ModelConfig
from files import atomic_write
from model import CaptionModel
from tokenizer import CaptionTokenizer

FORMAT = "image-captioner"
FORMAT_VERSION = 1
SAFETENSORS_FILES = ("model.safetensors", "config.json", "tokenizer.json")
HUB_FILENAME = "captioner.pt"  # the model file's name in a Hub repository
_METADATA = "metadata."  # the prefix of metadata tensors stored in model.safetensors


MAX_MESSAGE = 200  # characters: an error is one short line, not a library's paragraph


class CheckpointError(ValueError):
    """A model or training file that cannot be used; one line (at most MAX_MESSAGE characters) naming the file and
    the problem."""

    def __init__(self, message: str):
        line = " ".join(message.split())
        super().__init__(line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 1] + "…")


def _detail(error: BaseException) -> str:
    """The first sentence of a library's error, which says what went wrong; the rest is advice for its own users."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ", 1)[0].rstrip(".")[:80]


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, atomically."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def load_torch(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into a `CheckpointError` naming the file."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise CheckpointError(f"{name}: is a folder, not a checkpoint file")
    if not os.path.exists(name):
        raise CheckpointError(f"{name}: no such file")
    if os.path.getsize(name) == 0:
        raise CheckpointError(f"{name}: the file is empty")
    try:
        return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "Unsupported global" in str(error):  # a class or function reference
            raise CheckpointError(
                f"{name}: refused: it contains pickled Python objects, which could run code when loaded"
            ) from error
        raise CheckpointError(f"{name}: not a readable checkpoint (corrupt pickle data)") from error
    except Exception as error:  # garbage input makes torch's unpickler raise KeyError, IndexError, struct.error...
        raise CheckpointError(f"{name}: not a readable checkpoint, truncated or corrupt ({_detail(error)})") from error


def checkpoint_dict(model: CaptionModel, tokenizer: CaptionTokenizer, metadata: dict | None = None) -> dict:
    """What a `.pt` model file holds; `state_dict` is stored as given (callers may cast it to float16)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "tokenizer": tokenizer.to_json(),
        "state_dict": model.state_dict(),
        "metadata": dict(metadata or {}),
    }


def save_captioner(
    path: str | os.PathLike,
    model: CaptionModel,
    tokenizer: CaptionTokenizer,
    metadata: dict | None = None,
    *,
    half: bool = False,
) -> None:
    """Write a self-contained model file (config, tokenizer, weights, metadata), atomically.

    Args:
        half: store floating-point weights as float16 (half the size; they are cast back on load).
    """
    contents = checkpoint_dict(model, tokenizer, metadata)
    if half:
        contents["state_dict"] = {
            key: value.half() if value.is_floating_point() else value for key, value in contents["state_dict"].items()
        }
    save_torch(contents, path)


def update_metadata(path: str | os.PathLike, updates: dict) -> None:
    """Merge `updates` into a `.pt` model file's metadata, atomically; weights and everything else unchanged."""
    contents = _read_model_file(path)
    contents["metadata"] = {**(contents.get("metadata") or {}), **updates}
    save_torch(contents, path)


def load_model_file(path: str | os.PathLike) -> tuple[CaptionModel, CaptionTokenizer, dict]:
    """Model (in eval mode, float32, on CPU), tokenizer and metadata from a `.pt` file or a safetensors folder."""
    name = os.fspath(path)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "model.safetensors")):
        return import_safetensors(name)
    return _build(name, _read_model_file(name))


def _read_model_file(path: str | os.PathLike) -> dict:
    """The contents of a `.pt` model file (or training checkpoint), refusing any other torch file."""
    name = os.fspath(path)
    contents = load_torch(name)
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not a captioner model file (no '{FORMAT}' format marker)")
    return contents


def _build(name: str, contents: dict) -> tuple[CaptionModel, CaptionTokenizer, dict]:
    version = contents.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{name}: format version {version!r} is newer than this code reads ({FORMAT_VERSION}); update the code"
        )
    missing = [key for key in ("config", "tokenizer", "state_dict") if key not in contents]
    if missing:
        raise CheckpointError(f"{name}: incomplete model file, missing {', '.join(missing)}")
    try:
        config = ModelConfig.from_dict(dict(contents["config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{name}: bad model config ({_detail(error)})") from error
    try:
        tokenizer = CaptionTokenizer.from_json(contents["tokenizer"])
    except Exception as error:  # the tokenizers library raises its own untyped Exception
        raise CheckpointError(f"{name}: bad tokenizer ({_detail(error)})") from error
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{name}: tokenizer has {tokenizer.vocab_size} tokens but the model expects {config.vocab_size}"
        )
    model = CaptionModel(config)
    try:
        model.load_state_dict(contents["state_dict"], strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{name}: weights do not match the model config ({detail})") from error
    return model.eval(), tokenizer, dict(contents.get("metadata") or {})


def download(repo_id: str, revision: str | None = None) -> Path:
    """The model file of a Hub repository (cached; `revision` pins a branch, tag or commit)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, HUB_FILENAME, revision=revision))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{repo_id}: cannot get {HUB_FILENAME} from the Hugging Face Hub ({detail})") from error


def export_safetensors(
    directory: str | os.PathLike, model: CaptionModel, tokenizer: CaptionTokenizer, metadata: dict | None = None
) -> list[Path]:
    """Write the Hub layout: model.safetensors, config.json (format, model config, metadata), tokenizer.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(model.config)}
    # Tensors in the metadata (the familiarity bank) go into model.safetensors, the rest into config.json.
    config["metadata"] = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, dict):
            state |= {f"{_METADATA}{key}.{k}": v.contiguous() for k, v in value.items() if isinstance(v, torch.Tensor)}
            value = {k: v for k, v in value.items() if not isinstance(v, torch.Tensor)}
        config["metadata"][key] = value
    atomic_write(directory / "model.safetensors", lambda temporary: save_file(state, temporary))
    atomic_write(directory / "config.json", lambda temporary: Path(temporary).write_text(json.dumps(config, indent=2)))
    atomic_write(directory / "tokenizer.json", lambda temporary: Path(temporary).write_text(tokenizer.to_json()))
    return [directory / file for file in SAFETENSORS_FILES]


def import_safetensors(directory: str | os.PathLike) -> tuple[CaptionModel, CaptionTokenizer, dict]:
    """Load the layout `export_safetensors` writes."""
    name = os.fspath(directory)
    for file in SAFETENSORS_FILES:
        if not os.path.isfile(os.path.join(name, file)):
            raise CheckpointError(f"{name}: missing {file}")
    try:
        config = json.loads(Path(name, "config.json").read_text(encoding="utf-8"))
        tokenizer_json = Path(name, "tokenizer.json").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{name}: unreadable config.json or tokenizer.json ({_detail(error)})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{name}: config.json is not a captioner config (no '{FORMAT}' format marker)")
    try:
        state_dict = load_file(os.path.join(name, "model.safetensors"))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{name}: model.safetensors is truncated or corrupt ({_detail(error)})") from error
    metadata = dict(config.get("metadata") or {})
    for key in [key for key in state_dict if key.startswith(_METADATA)]:
        part, field_name = key.removeprefix(_METADATA).split(".", 1)
        metadata.setdefault(part, {})[field_name] = state_dict.pop(key)
    contents = {**config, "metadata": metadata, "tokenizer": tokenizer_json, "state_dict": state_dict}
    return _build(name, contents)


# ---- training checkpoints: a model file plus the state that continues the run exactly ----


@dataclass
class TrainingState:
    """What `train.py --resume` needs besides the model: stored under "training" in last.pt and best.pt."""

    optimizer: dict  # the optimizer's state_dict
    step: int  # optimizer steps taken
    config: dict  # asdict(TrainConfig) of the run, to refuse resuming with other settings
    rng: dict  # torch's random state (and CUDA's), so dropout and data choices continue the same way
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    best_cider: float = -1.0  # the best validation score so far (best.pt's)
    objective: dict = field(default_factory=dict)  # the objective's own state (train.Objective): training only


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    path: str | os.PathLike, model: CaptionModel, tokenizer: CaptionTokenizer, metadata: dict, state: TrainingState
) -> None:
    """A model file that `train.py --resume` can also continue, written atomically."""
    contents = checkpoint_dict(model, tokenizer, metadata)
    contents["training"] = asdict(state)
    try:
        save_torch(contents, path)
    except OSError as error:  # e.g. disk full: atomic_write kept the previous file
        raise CheckpointError(
            f"{os.fspath(path)}: could not write ({error.strerror or error}); the previous file is intact"
        ) from error


def load_training_checkpoint(path: str | os.PathLike) -> tuple[CaptionModel, CaptionTokenizer, TrainingState]:
    """Model, tokenizer and training state of a checkpoint `save_training_checkpoint` wrote."""
    name = os.fspath(path)
    contents = _read_model_file(name)
    if "training" not in contents:
        raise CheckpointError(f"{name}: not a training checkpoint (no optimizer state)")
    model, tokenizer, _ = _build(name, contents)
    try:
        saved = dict(contents["training"])
        if "distillation_head" in saved:  # checkpoints from before objectives kept their own state
            saved["objective"] = saved.pop("distillation_head")
        state = TrainingState(**saved)
    except TypeError as error:
        raise CheckpointError(f"{name}: unreadable training state ({_detail(error)})") from error
    return model, tokenizer, state
