"""The web app: caption a photo (with alternatives and where the model looked), or a whole batch of files.

    python app.py                         # the shipped captioner.pt, http://127.0.0.1:7860
    python app.py --model user/repo       # a model from the Hugging Face Hub
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py

A thin layer over `captioner.Captioner`: it checks what users send, turns every problem into a `gr.Error` with a
specific message, and shapes results for display. Endpoints for `gradio_client`: `/caption` and `/caption_batch`.
"""

import argparse
import atexit
import base64
import contextlib
import csv
import ctypes
import dataclasses
import hashlib
import inspect
import io
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from captioner import Caption, Captioner
from checkpoint import CheckpointError
from cli import add_model_arguments, captioner_from_args
from config import DECODE_LIMITS, STRATEGIES, DecodeConfig
from images import IMAGE_SUFFIXES, ImageError, ImageSource, load_image
from serving import BatchingCaptioner

EXAMPLES = Path(__file__).resolve().parent / "examples"
# The app leads with photos of the model's world, then one it does not know, which shows the unfamiliar-photo note.
APP_EXAMPLES = (
    "dog_in_woods.jpg", "paddling_in_the_sea.jpg", "man_at_the_canyon.jpg", "woman_on_the_beach.jpg",
    "grace_hopper.jpg", "coffee.jpg",
)  # fmt: skip
UNFAMILIAR_NOTE = "⚠️ **This photo looks unlike the photos this model learned from, so the caption is probably wrong.**"
MODEL_WORLD = "It knows everyday photos of people, dogs and outdoor scenes."
SHOWN_LABEL_PROBABILITY = 0.05  # labels shown beside a caption: the first, and any others at least this probable
MAX_BATCH_FILES = 200
MAX_ZIP_BYTES = 300 * 1024 * 1024  # uncompressed total of one .zip
QUEUE_SIZE = 64  # requests waiting beyond this are told the server is busy
BATCH_CONCURRENCY = 1  # folders of photos: one at a time, each already batched inside
CAPTION_CONCURRENCY = 8  # single photos: enough parallel requests for the batcher to group them
# What one upload may cost. The model sees 224 px and the attention overlay is shown at most PHOTO_SIDE wide, so a
# photo is decoded no larger than that (JPEGs at a fraction of their size); a format that cannot be decoded smaller
# (PNG) is held whole for a moment (about 220 MB at the cap), so the pixels are capped well below Pillow's 89.5 MP,
# and one image is decoded at a time across all requests (a phone's JPEG, drafted, takes milliseconds).
APP_MAX_PIXELS = 50_000_000
PHOTO_SIDE = 1024
DECODE_SLOTS = threading.BoundedSemaphore(1)
TEMP_FILE_SECONDS = 15 * 60  # uploads, overlays and CSVs are deleted this long after they were made
NOT_UPLOADED = "The app reads only files uploaded to it: please upload the photo itself."


# ---- reading what the browser or gradio_client sends ----


def uploaded_file(path: str) -> str:
    """`path`, resolved, if Gradio itself placed a regular file there (its upload cache) or it is one of the app's
    examples; else the one refusal, which says nothing about what exists on the server.

    Gradio's file components pass on whatever path a raw API call names, so every handler checks each path here.
    """
    try:
        resolved = os.path.realpath(path)
    except (ValueError, OSError):  # a NUL byte, a name too long
        raise gr.Error(NOT_UPLOADED) from None
    roots = (os.path.realpath(gr.utils.get_upload_folder()), str(EXAMPLES))
    if not any(os.path.commonpath([resolved, root]) == root for root in roots):
        raise gr.Error(NOT_UPLOADED)
    try:
        regular = stat.S_ISREG(os.stat(resolved).st_mode)  # a FIFO or device would block or never end
    except (OSError, ValueError):
        regular = False
    if not regular:
        raise gr.Error(NOT_UPLOADED)
    return resolved


def load_upload(source: ImageSource) -> Image.Image:
    """An uploaded image decoded at no more than the app needs, with the app's pixel cap, in one of DECODE_SLOTS."""
    with DECODE_SLOTS:
        try:
            return load_image(source, max_pixels=APP_MAX_PIXELS, max_side=PHOTO_SIDE)
        finally:
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the memory of a freed full-size decode back to the system (glibc keeps it for reuse otherwise, and a
    server that decoded a few large PNGs would hold hundreds of MB for good). Nothing to do off glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


try:
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def _image_from_payload(payload) -> Image.Image:
    """A loaded image from the unprocessed Image/File payload (a dict with `path`, or a data: URL)."""
    if payload is None:
        raise gr.Error("Please add a photo first (upload, paste or webcam).")
    if isinstance(payload, dict):
        path, url = payload.get("path"), payload.get("url") or ""
    else:  # a plain path string, e.g. from gr.Examples
        path, url = str(payload), ""
    if not isinstance(url, str) or not isinstance(path, str | None):
        raise gr.Error(NOT_UPLOADED)
    if not url.startswith("data:"):
        path = uploaded_file(path) if path else None
    try:
        if url.startswith("data:"):
            return load_upload(base64.b64decode(url.split(",", 1)[1]))
        if not path:
            raise ImageError("no file was received")
        return load_upload(path)
    except ImageError as error:
        raise gr.Error(_user_message(error, payload)) from error
    except (ValueError, IndexError) as error:
        raise gr.Error("The upload could not be decoded as an image.") from error


def _user_message(error: ImageError, payload) -> str:
    """The error under the name the user knows, never the server's path for the file."""
    name = payload.get("orig_name") if isinstance(payload, dict) else None
    return f"{name or 'The photo'}: {_reason(error)}"


# ---- the decoding options: defined once, for the controls, the handlers and the API ----


@dataclass(frozen=True)
class Option:
    """A decoding control: its API parameter name, its label, and its range (within DECODE_LIMITS)."""

    name: str  # a DecodeConfig field, except num_alternatives (num_return_sequences - 1)
    label: str
    shown: tuple[float, float] | None = None  # a narrower slider range than the accepted one, for usability
    step: float = 1
    single_photo_only: bool = False  # not offered for batches

    def control(self, default: DecodeConfig, token_limit: int) -> gr.components.Component:
        """The form control, starting at the model's default."""
        if self.name == "strategy":
            return gr.Radio(list(STRATEGIES), value=default.strategy, label=self.label)
        if self.name == "seed":
            return gr.Number(value=-1, precision=0, label=self.label)
        if self.name == "prefix":
            return gr.Textbox(value=default.prefix, label=self.label, placeholder="e.g. a photo of")
        low, high = DECODE_LIMITS["num_return_sequences" if self.name == "num_alternatives" else self.name]
        if self.name == "num_alternatives":
            low, high, value = low - 1, high - 1, 2
        else:
            value = getattr(default, self.name)
        if self.shown:
            low, high = max(low, self.shown[0]), min(high, self.shown[1])
        if self.name == "max_new_tokens":
            high, value = min(high, token_limit), min(value, token_limit)
        return gr.Slider(low, high, value=value, step=self.step, label=self.label)


OPTIONS: tuple[Option, ...] = (
    Option("strategy", "Strategy"),
    Option("num_beams", "Beams (beam search)", shown=(1, 8)),
    Option("length_penalty", "Length penalty (beam search; higher: longer)", shown=(-1.0, 3.0), step=0.1),
    Option("max_new_tokens", "Max new tokens", shown=(1, 60)),
    Option("no_repeat_ngram_size", "No-repeat n-gram size (0: off)", shown=(0, 5)),
    Option("num_alternatives", "Alternative captions (beam or sampling)", shown=(0, 7), single_photo_only=True),
    Option("temperature", "Temperature (sampling)", shown=(0.1, 2.0), step=0.05),
    Option("top_k", "Top-k (sampling; 0: off)", shown=(0, 200)),
    Option("top_p", "Top-p (sampling)", shown=(0.05, 1.0), step=0.05),
    Option("seed", "Seed (sampling; -1: random)"),
    Option("prefix", "Caption must continue this text"),
)
BATCH_OPTIONS = tuple(option for option in OPTIONS if not option.single_photo_only)


def decode_config(default: DecodeConfig, **values) -> DecodeConfig:
    """The decoding options from the form or an API call (named as in OPTIONS; missing ones keep the model's
    defaults) as a checked DecodeConfig; gr.Error if one is out of range."""
    try:
        prefix = values.get("prefix", default.prefix)
        if prefix is not None and not isinstance(prefix, str):
            raise ValueError(f"prefix must be text, got {prefix!r}")
        strategy = values.get("strategy", default.strategy)
        beams = _whole("num_beams", values.get("num_beams", default.num_beams))
        alternatives = _whole("alternatives", values.get("num_alternatives", 0))
        returned = {"beam": min(beams, 1 + alternatives), "greedy": 1}.get(strategy, 1 + alternatives)
        max_new_tokens = _whole("max_new_tokens", values.get("max_new_tokens", default.max_new_tokens))
        seed = values.get("seed")
        return dataclasses.replace(
            default,
            strategy=strategy,
            num_beams=beams,
            length_penalty=float(values.get("length_penalty", default.length_penalty)),
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=_whole(
                "no_repeat_ngram_size", values.get("no_repeat_ngram_size", default.no_repeat_ngram_size)
            ),
            num_return_sequences=returned,
            temperature=float(values.get("temperature", default.temperature)),
            top_k=_whole("top_k", values.get("top_k", default.top_k)),
            top_p=float(values.get("top_p", default.top_p)),
            seed=None if seed is None or seed == "" or float(seed) < 0 else _whole("seed", seed),
            prefix=(prefix or "").strip(),
            min_new_tokens=min(default.min_new_tokens, max_new_tokens),
        )
    except (TypeError, ValueError) as error:
        raise gr.Error(f"Invalid option: {error}") from error


def _with_option_parameters(handler: Callable, first: str, options: Sequence[Option], *, progress: bool = False):
    """`handler(first, **options[, progress])` with the signature `(first, <each option by name>)`, which Gradio
    reads for the API's parameter names (gradio_client calls them by keyword, e.g. max_new_tokens=3)."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, positional) for name in (first, *(option.name for option in options))]
    if progress:  # Gradio hands a progress tracker to a parameter whose default is gr.Progress()
        parameters.append(inspect.Parameter("progress", positional, default=gr.Progress()))

    def bound(*values):
        named = dict(zip((option.name for option in options), values[1:], strict=False))
        extra = {"progress": values[-1]} if progress else {}
        return handler(values[0], **named, **extra)

    bound.__signature__ = inspect.Signature(parameters)
    bound.__name__ = handler.__name__
    return bound


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    number = float(value)
    if not np.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


# ---- shaping results ----


def attention_overlay(photo: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """The photo with a word's attention map laid over it in red (strong) to transparent (none)."""
    peak = float(heatmap.max()) or 1.0
    grid = Image.fromarray((np.clip(heatmap / peak, 0, 1) * 255).astype(np.uint8))
    mask = grid.resize(photo.size, Image.Resampling.BICUBIC)
    red = Image.new("RGB", photo.size, (230, 30, 30))
    dimmed = Image.blend(photo.convert("RGB"), Image.new("RGB", photo.size, (0, 0, 0)), 0.35)
    return Image.composite(red, dimmed, mask.point(lambda value: int(value * 0.75))).convert("RGB")


class TempFiles:
    """The app's own files (overlays, CSV downloads) in one folder, each written whole before it appears under its
    name, and deleted `seconds` after it was last written."""

    def __init__(self, folder: Path, seconds: int):
        self.folder, self.seconds = folder, seconds
        self._last_sweep = 0.0

    def write(self, name: str, data: bytes) -> str:
        """folder/name holding `data`, written to a staging file and renamed into place. Written even when it
        exists: two identical requests then each hand on a whole file, and its fresh time keeps the sweep off it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if time.monotonic() - self._last_sweep > min(60, self.seconds):
            self._last_sweep = time.monotonic()
            delete_older_than(self.folder, self.seconds)
        handle, staging = tempfile.mkstemp(dir=self.folder, suffix=".partial")
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(staging, self.folder / name)
        return str(self.folder / name)

    def image(self, image: Image.Image) -> str:
        """`image` as a PNG named by its content.

        Returned as a PIL image, gradio would write it to a cache path named by its content with a plain write, so
        two requests with the same overlay (two people captioning the same example at once) could read each other's
        half-written file; a returned path is copied into gradio's cache atomically instead.
        """
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.write(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}.png", buffer.getvalue())

    def csv(self, rows: list[list]) -> str:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["file", "caption", "confidence", "error"])
        writer.writerows(rows)
        data = text.getvalue().encode("utf-8")
        return self.write(f"captions-{hashlib.sha256(data).hexdigest()[:16]}.csv", data)


def delete_older_than(folder: Path, seconds: float) -> None:
    """Delete the files in `folder` last written more than `seconds` ago (another process may delete them too)."""
    cutoff = time.time() - seconds
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def _details(caption: Caption, config: DecodeConfig) -> dict:
    return {
        "caption": caption.text,
        "confidence": round(caption.confidence, 4),
        "score": round(caption.score, 4),
        "num_tokens": len(caption.token_ids),
        "familiarity": None if caption.familiarity is None else round(caption.familiarity, 4),
        "unfamiliar": caption.unfamiliar,
        "neighbours": [
            {"path": os.path.basename(n.name), "similarity": n.similarity, "caption": n.caption}
            for n in caption.neighbours
        ],
        "labels": [{"label": label.name, "probability": label.probability} for label in caption.labels],
        "alternatives": [
            {"caption": other.text, "confidence": round(other.confidence, 4), "score": round(other.score, 4)}
            for other in caption.alternatives
        ],
        "decoding": dataclasses.asdict(config),
    }


def summary(caption: Caption) -> str:
    """What is shown beside the caption: its confidence and the photo's ImageNet labels; for a photo unlike the
    training photos, the warning first, then what the photo looks like."""
    shown = [
        label for index, label in enumerate(caption.labels) if not index or label.probability >= SHOWN_LABEL_PROBABILITY
    ]
    looks = ", ".join(f"{label.name} ({label.probability:.0%})" for label in shown)
    confidence = f"Confidence {caption.confidence:.0%}"
    if caption.unfamiliar:
        return f"{UNFAMILIAR_NOTE} " + (f"It looks like: **{looks}**" if looks else MODEL_WORLD) + f"\n\n{confidence}"
    return confidence + (f"\n\nImageNet labels: {looks}" if looks else "")


def about_markdown(captioner: Captioner) -> str:
    """The About tab: the model card its file's record renders (release.ModelInfo), as the Hub shows it."""
    return captioner.info.render("About this model", captioner.model.config, "Captioner.load()")


# ---- the app ----


def build_app(
    captioner: Captioner, *, queue_size: int = QUEUE_SIZE, temp_file_seconds: int = TEMP_FILE_SECONDS
) -> gr.Blocks:
    """The web app over `captioner`: a caption tab, a batch tab and the model card. Gradio's copies of uploads and
    results are deleted `temp_file_seconds` after they were made, checked as often."""
    temp_files = TempFiles(Path(tempfile.mkdtemp(prefix="image-captioner-")), temp_file_seconds)
    atexit.register(shutil.rmtree, temp_files.folder, ignore_errors=True)
    with gr.Blocks(title="Image Captioner", delete_cache=(temp_file_seconds, temp_file_seconds)) as app:
        gr.Markdown(
            "# Image Captioner\nA small ViT + GPT-2 captioner that runs on a laptop CPU. "
            "Add a photo and press **Caption**."
        )
        with gr.Tab("Caption"):
            controls = _caption_tab(captioner, temp_files)
        with gr.Tab("Batch"):
            _batch_tab(captioner, controls, temp_files)
        with gr.Tab("About this model"):
            gr.Markdown(about_markdown(captioner))
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return app


def _caption_tab(captioner: Captioner, temp_files: TempFiles) -> dict[str, gr.components.Component]:
    """One photo: its caption, alternatives, confidence and per-word attention. Returns the option controls, which
    the batch tab shares."""
    default = captioner.default_config()
    batcher = BatchingCaptioner(captioner)

    def caption_photo(image, **values):
        config = decode_config(default, **values)
        photo = _image_from_payload(image)
        try:
            caption = batcher.caption(photo, config, attention=True)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        rows = [[c.text, round(c.confidence, 3), round(c.score, 3)] for c in (caption, *caption.alternatives)]
        words = list(caption.words)
        overlay = temp_files.image(attention_overlay(photo, caption.attention[0])) if words else None
        state = {"photo": photo, "maps": caption.attention}
        # A word can occur twice ("a ... a"): choices are (word, position) pairs.
        word_choice = gr.Radio(
            choices=[(word, index) for index, word in enumerate(words)], value=0, visible=bool(words)
        )
        return caption.text, _details(caption, config), summary(caption), rows, word_choice, overlay, state

    def show_word(position, state):
        if not state or not isinstance(position, int) or not 0 <= position < len(state["maps"]):
            return None
        return temp_files.image(attention_overlay(state["photo"], state["maps"][position]))

    token_limit = captioner.model.config.n_positions - 1
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(sources=["upload", "clipboard", "webcam"], type="filepath", label="Photo", height=360)
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Accordion("Decoding options", open=False):
                controls = {option.name: option.control(default, token_limit) for option in OPTIONS}
            gr.Examples(examples=[str(EXAMPLES / name) for name in APP_EXAMPLES], inputs=image, label="Examples")
        with gr.Column(scale=1):
            caption = gr.Textbox(
                label="Caption", elem_id="caption-text", lines=2, buttons=["copy"], elem_classes="caption-text"
            )
            confidence = gr.Markdown(label="Confidence", elem_id="caption-confidence")
            table = gr.Dataframe(
                headers=["caption", "confidence", "score"], label="Best caption and alternatives", interactive=False
            )
            word = gr.Radio(choices=[], label="Where the model looked for this word", visible=False)
            overlay = gr.Image(label="Attention", interactive=False, height=300)
            details = gr.JSON(label="Details", visible=False)
    state = gr.State()
    button.click(
        _with_option_parameters(caption_photo, "image", OPTIONS),
        [image, *(controls[option.name] for option in OPTIONS)],
        [caption, details, confidence, table, word, overlay, state],
        api_name="caption",
        preprocess=False,
        concurrency_limit=CAPTION_CONCURRENCY,
    )
    word.change(show_word, [word, state], overlay, api_visibility="private")
    return controls


def _batch_tab(captioner: Captioner, controls: dict[str, gr.components.Component], temp_files: TempFiles) -> None:
    """Many photos, or a .zip of them: a table of captions and a CSV to download."""
    default = captioner.default_config()

    def caption_files(files, progress, **values):
        config = decode_config(default, **values)
        named_sources = _batch_sources(files)
        rows = []
        progress(0, desc="Captioning")
        sources = [source for _, source in named_sources]
        results = captioner.caption_each(sources, config, batch_size=8, load=load_upload)
        for index, ((name, _), result) in enumerate(zip(named_sources, results, strict=True)):
            if isinstance(result, ImageError):
                rows.append([name, "", None, _reason(result)])
            else:
                rows.append([name, result.text, round(result.confidence, 3), ""])
            progress((index + 1) / len(named_sources), desc=f"Captioned {index + 1} of {len(named_sources)}")
        return rows, temp_files.csv(rows)

    gr.Markdown(f"Caption up to {MAX_BATCH_FILES} photos at once: select several files, or one `.zip` of them.")
    files = gr.File(file_count="multiple", label="Photos or a .zip", file_types=["image", ".zip"])
    button = gr.Button("Caption all", variant="primary")
    results = gr.Dataframe(headers=["file", "caption", "confidence", "error"], label="Captions", interactive=False)
    download = gr.File(label="Download CSV")
    button.click(
        _with_option_parameters(caption_files, "files", BATCH_OPTIONS, progress=True),
        [files, *(controls[option.name] for option in BATCH_OPTIONS)],
        [results, download],
        api_name="caption_batch",
        preprocess=False,
        concurrency_limit=BATCH_CONCURRENCY,
    )


def _reason(error: ImageError) -> str:
    """The error without its leading file name (a server-side temporary path the user never saw)."""
    return str(error).split(": ", 1)[-1]


def _batch_sources(files) -> list[tuple[str, object]]:
    """(display name, image source) for each uploaded file, expanding .zip files in memory."""
    if not files:
        raise gr.Error("Please add some photos (or a .zip of photos) first.")
    payloads = files if isinstance(files, list) else [files]
    sources: list[tuple[str, object]] = []
    for payload in payloads:
        path = payload.get("path") if isinstance(payload, dict) else str(payload)
        if not isinstance(path, str) or not path:
            raise gr.Error(NOT_UPLOADED)
        path = uploaded_file(path)
        name = (payload.get("orig_name") if isinstance(payload, dict) else None) or os.path.basename(path)
        if not isinstance(name, str):
            raise gr.Error(NOT_UPLOADED)
        if name.lower().endswith(".zip"):
            sources += _zip_sources(path, name)
        else:
            sources.append((name, path))
        if len(sources) > MAX_BATCH_FILES:
            raise gr.Error(f"Too many files: at most {MAX_BATCH_FILES} per batch.")
    if not sources:
        raise gr.Error("The .zip holds no image files (JPEG, PNG, GIF, WebP, BMP, TIFF).")
    return sources


def _zip_sources(path: str, name: str) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [
                info for info in archive.infolist()
                if not info.is_dir() and Path(info.filename).suffix.lower() in IMAGE_SUFFIXES
                and not Path(info.filename).name.startswith(".")
            ]  # fmt: skip
            if len(entries) > MAX_BATCH_FILES:
                raise gr.Error(f"{name} holds {len(entries)} images; at most {MAX_BATCH_FILES} per batch.")
            if sum(info.file_size for info in entries) > MAX_ZIP_BYTES:
                raise gr.Error(f"{name} unpacks to more than {MAX_ZIP_BYTES // 2**20} MiB; send fewer photos.")
            return [(f"{name}/{info.filename}", archive.read(info)) for info in entries]
    except (zipfile.BadZipFile, OSError) as error:
        raise gr.Error(f"{name} is not a readable .zip file.") from error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="waiting requests beyond this are refused")
    parser.add_argument(
        "--temp-file-seconds", type=int, default=TEMP_FILE_SECONDS,
        help="uploads, overlays and CSV downloads are deleted this long after they were made",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    if arguments.temp_file_seconds < 1:
        parser.error("--temp-file-seconds must be at least 1")
    try:
        captioner = captioner_from_args(arguments)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = build_app(captioner, queue_size=arguments.queue_size, temp_file_seconds=arguments.temp_file_seconds)
    app.launch(share=arguments.share, show_error=True, max_file_size="50mb", css=CSS, footer_links=["api", "gradio"])
    return 0


CSS = ".caption-text textarea { font-size: 1.5rem !important; line-height: 1.4; }"

if __name__ == "__main__":
    sys.exit(main())
