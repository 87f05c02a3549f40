"""The `Captioner` facade: the one object the app, the command line and evaluation use.

    captioner = Captioner.load("captioner.pt")
    [best] = captioner.caption(["photo.jpg"], strategy="beam", num_beams=3)
    best.text, best.confidence, best.alternatives

Confidence is the geometric mean of the model's probabilities for the caption's tokens (EOS included):
``exp(mean token log-probability)``, between 0 and 1, from the raw model, before penalties or temperature.
"""

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import decoding
from checkpoint import CheckpointError, download, load_model_file
from config import DecodeConfig
from familiarity import FamiliarityModel
from images import ImageError, ImageSource, ImageTransform, load_each, load_image
from labels import TRANSFORM as LABEL_TRANSFORM
from labels import Label, Recogniser, shares_resize
from model import CaptionModel, StepDecoder
from openvino_runtime import OpenVinoModel, RuntimeUnavailable
from precision import (
    INT8_ENCODER,
    OPENVINO,
    TORCH,
    accepted_precisions,
    compute_dtype,
    default_device,
    inference_setting,
    quantize,
    setting_name,
)
from release import ModelInfo
from retrieval import Datastore, memory_ids
from speculative import DraftTable
from tokenizer import CaptionTokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent / "captioner.pt"


@dataclass(frozen=True)
class Caption:
    text: str
    confidence: float  # exp(mean token log-probability), see the module doc
    score: float  # the decoder's ranking score (length-penalised for beam search)
    token_ids: tuple[int, ...]  # generated tokens, EOS included when reached (the prefix is not)
    token_logprobs: tuple[float, ...]
    words: tuple[str, ...] = ()  # the caption's words, when attention was requested
    attention: np.ndarray | None = None  # (len(words), grid_h, grid_w): where the model looked for each word
    alternatives: tuple["Caption", ...] = field(default=())  # the other returned captions, best first
    familiarity: float | None = None  # the share of in-domain photos as unusual as this one (familiarity.py); None:
    unfamiliar: bool | None = None  # the model file cannot tell. True: unlike the training photos, probably wrong
    neighbours: tuple["Neighbour", ...] = ()  # a retrieval model: the datastore photos whose captions it read
    labels: tuple[Label, ...] = ()  # the photo's ImageNet labels, most probable first (empty: no recogniser)


@dataclass(frozen=True)
class Neighbour:
    """A datastore photo whose caption a retrieval model read while captioning (retrieval.py)."""

    name: str  # the photo's file name (training photos) or path (a user's datastore)
    similarity: float  # cosine similarity of the two photos' class tokens
    caption: str


@dataclass(frozen=True)
class EncodedImages:
    """Image tokens from `Captioner.encode`, reusable across several decodings of the same images."""

    tokens: Tensor  # (B, N, C)
    class_tokens: Tensor | None = None  # (B, C_img): the encoder's summary of each photo, for its familiarity
    includes_memory: bool = False  # a retrieval model's tokens already end with the nearest photos' captions
    labels: tuple[tuple[Label, ...], ...] = ()  # each photo's ImageNet labels, where the model file has a recogniser


class Captioner:
    """A trained model, its tokenizer and preprocessing, on one device and in one precision.

    Half precision reads half the weight bytes per generated token, which is what a caption's decoding time mostly
    is (see benchmark.py); float16 suits GPUs, bfloat16 GPUs and CPUs with AVX-512 BF16.
    """

    def __init__(
        self,
        model: CaptionModel,
        tokenizer: CaptionTokenizer,
        info: ModelInfo | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        runtime: str = "auto",
        datastore: Datastore | None = None,
    ):
        """`runtime`: "torch", "openvino" (the encoder and decoding step compiled for the CPU), or "auto": OpenVINO
        where the model's recorded scores accept it in this precision and it is installed (precision.py).
        `datastore`: for a retrieval model, the photos whose captions it reads (default: the one in its file)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.info = info or ModelInfo()  # what the model file records about the model (release.py)
        self.runtime, self.precision = inference_setting(dtype, runtime, self.device, accepted_precisions(self.info))
        model = model.to(self.device).eval()
        self.recogniser = Recogniser(self.info.recogniser, self.device) if self.info.recogniser else None
        # The encoder, decoding step and recogniser as OpenVINO runs them, or None: PyTorch runs them.
        self.compiled = self._compile(model, dtype, runtime)
        if self.compiled is not None and self.recogniser is not None:
            self.recogniser.classify = self.compiled.classify
        self.dtype = compute_dtype(self.precision)
        self.model = quantize(model, self.precision)
        # What decodes: OpenVINO's compiled step where it has one (float32), else the model itself.
        self.decoder: StepDecoder = (
            self.compiled.steps if self.compiled is not None and self.compiled.steps else self.model
        )
        self.tokenizer = tokenizer
        self.transform = ImageTransform.for_model(model.config)
        # The training captions' n-gram table, where the model file has one: greedy decoding then checks several
        # drafted tokens per pass, with the same output (speculative.py).
        self.draft = DraftTable.from_dict(self.info.draft) if self.info.draft else None
        self.familiarity = FamiliarityModel.from_dict(self.info.familiarity) if self.info.familiarity else None
        self.datastore = datastore or (Datastore.from_dict(self.info.datastore) if self.info.datastore else None)

    def _compile(self, model: CaptionModel, dtype: str | torch.dtype, runtime: str) -> OpenVinoModel | None:
        """The model compiled by OpenVINO where that is the chosen runtime. Under "auto" (but for "int8-encoder",
        which only OpenVINO runs), a runtime that refuses the model falls back to PyTorch (`self.runtime`,
        `self.precision` follow) with a warning."""
        if self.runtime != OPENVINO:
            return None
        try:
            recogniser = self.recogniser.model if self.recogniser is not None else None
            return OpenVinoModel.compile(
                model.float(), self.precision, recogniser=recogniser, int8_encoder=self.info.int8_encoder
            )
        except RuntimeUnavailable as error:
            if runtime != "auto" or dtype == INT8_ENCODER:  # asked for, or a precision only OpenVINO runs
                raise
            warnings.warn(f"{error}; running in PyTorch instead", stacklevel=3)
            self.runtime, self.precision = inference_setting(dtype, TORCH, self.device, accepted_precisions(self.info))
            return None

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        datastore: str | os.PathLike | None = None,
        datastore_only: bool = False,
        runtime: str = "auto",
    ) -> "Captioner":
        """From a model file, a safetensors folder, or a Hugging Face Hub repo id ("user/repo"; `revision` pins it).

        Default: the `captioner.pt` shipped with this repository. `dtype`: a torch dtype or a precision name;
        "auto" runs the precision recorded with the model where this machine computes it natively, else float32.
        `runtime`: "torch", "openvino" or "auto" (OpenVINO where the model's recorded scores accept it), see
        `__init__`.
        `datastore`: a folder of the user's captioned photos (images with same-named .txt captions) that a retrieval
        model reads besides its own (their photos first when about as close), or instead of it (`datastore_only`).
        """
        path = Path(source) if source is not None else DEFAULT_MODEL
        if not path.exists() and source is not None and _looks_like_repo_id(str(source)):
            path = download(str(source), revision)
        model, tokenizer, metadata = load_model_file(path)
        try:
            info = ModelInfo.from_dict(metadata)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from error
        captioner = cls(model, tokenizer, info, device=device, dtype=dtype, runtime=runtime)
        if datastore is not None:
            captioner.add_datastore(datastore, replace=datastore_only)
        return captioner

    def add_datastore(self, folder: str | os.PathLike, *, replace: bool = False) -> Datastore:
        """Read a folder of captioned photos as a datastore, beside the model's own (ranked first when about as
        close) or, with `replace`, instead of it. Their embeddings are cached in the folder (retrieval.py)."""
        if self.model.memory is None:
            raise ValueError("this model reads no captions of nearest photos, so a datastore cannot steer it")
        user = Datastore.from_folder(folder, self._class_tokens_of, self._encoder_key())
        self.datastore = user if replace or self.datastore is None else user.with_priority(self.datastore)
        return user

    def _class_tokens_of(self, paths: list[Path]) -> Tensor:
        rows = [
            self.encode(paths[start : start + 16], labels=False).class_tokens.float().cpu()
            for start in range(0, len(paths), 16)
        ]
        return torch.cat(rows)

    def _encoder_key(self) -> str:
        """A name for what the encoder computes: its weights, input size, precision and runtime."""
        digest = hashlib.sha256(repr((self.transform, setting_name(self.runtime, self.precision))).encode())
        for name, tensor in self.model.encoder.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:20]

    def default_config(self) -> DecodeConfig:
        """The decoding the model's card recommends (saved with it), else `DecodeConfig`'s defaults, with
        max_new_tokens capped at what the model can hold."""
        config = DecodeConfig(**(self.info.decoding or {}))
        room = self.model.config.n_positions - 1
        return dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, room))

    def check(self, config: DecodeConfig) -> DecodeConfig:
        """`config`, if this model can honour it; else ValueError saying what to change."""
        room = self.model.config.n_positions - 1 - len(self._prefix_ids(config))
        if room < 1:
            raise ValueError("prefix is too long for this model")
        if config.max_new_tokens > room:
            raise ValueError(f"max_new_tokens must be at most {room} with this prefix (the model's limit)")
        return config

    def encode(self, images: Sequence[ImageSource], *, labels: bool = True) -> EncodedImages:
        """Encode images once; pass the result to `caption` as often as needed. With `labels`, also their ImageNet
        labels where the model file has a recogniser."""
        pictures = [load_image(image) for image in images]
        resized = self.transform.resize(pictures)
        label_images = self._label_images(pictures, resized) if labels else None
        return self.encode_pixels(self.transform.normalize(resized), label_images)

    def caption(
        self,
        images: Sequence[ImageSource] | EncodedImages,
        config: DecodeConfig | None = None,
        *,
        attention: bool = False,
        generator: torch.Generator | None = None,
        **options,
    ) -> list[Caption]:
        """The best caption for each image, with `config.num_return_sequences - 1` alternatives.

        Args:
            images: paths, bytes, PIL images or arrays (see `images.load_image`), or `encode`'s result.
            config: decoding options (default: the model's recommended ones, `default_config`); keyword `options`
                override its fields (e.g. ``num_beams=5``).
            attention: also return, for each word, the cross-attention over the image patches.
            generator: randomness for sampling; by default seeded from `config.seed` when set.
        """
        config = self.check(dataclasses.replace(config or self.default_config(), **options))
        encoded = images if isinstance(images, EncodedImages) else self.encode(images)
        return self._caption(encoded, config, attention, generator)

    def caption_each(
        self,
        sources: Sequence[ImageSource],
        config: DecodeConfig | None = None,
        *,
        batch_size: int = 16,
        load: Callable[[ImageSource], Image.Image] = load_image,
        **options,
    ) -> Iterator[Caption | ImageError]:
        """For each source in order, its caption or the `ImageError` that made it unusable; batched, never raises
        for a bad image. The way to caption a folder: one model, many images, failures reported per image. `load`
        reads one source (the app's decodes smaller, under its own limits)."""
        config = self.check(dataclasses.replace(config or self.default_config(), **options))
        batches = [sources[start : start + batch_size] for start in range(0, len(sources), batch_size)]
        # A reader thread decodes and resizes the next batch while this one is captioned: Pillow releases the GIL
        # there, so file reading overlaps the model's compute instead of adding to it. The first batch has nothing
        # to overlap with and is read here; the reader runs no torch code, which would start a second thread pool
        # competing with the model's.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-reader") as reader:
            upcoming = None
            for index, batch in enumerate(batches):
                loaded, resized, label_images = upcoming.result() if upcoming is not None else self._read(batch, load)
                upcoming = reader.submit(self._read, batches[index + 1], load) if index + 1 < len(batches) else None
                captions = iter([])
                if resized is not None:
                    captions = iter(
                        self._caption(
                            self.encode_pixels(self.transform.normalize(resized), label_images), config, False, None
                        )
                    )
                for picture in loaded:
                    yield picture if isinstance(picture, ImageError) else next(captions)

    def _read(
        self, sources: Sequence[ImageSource], load: Callable[[ImageSource], Image.Image]
    ) -> tuple[list[Image.Image | ImageError], np.ndarray | None, np.ndarray | None]:
        """Each source loaded (or its error), and the good ones resized for the model and for the recogniser (None
        if none are, or there is no recogniser)."""
        loaded = load_each(sources, load)
        good = [picture for picture in loaded if not isinstance(picture, ImageError)]
        resized = self.transform.resize(good) if good else None
        return loaded, resized, self._label_images(good, resized)

    def encode_pixels(self, pixels: Tensor, label_images: np.ndarray | None = None) -> EncodedImages:
        """`encode` for pixel values already made by `self.transform` (B, 3, size, size); with `label_images`
        (`_label_images`), also their ImageNet labels."""
        with torch.inference_mode():
            if self.compiled is None:
                encoded = EncodedImages(*self.model.encode_with_class_token(pixels.to(self.device, self.dtype)))
            else:
                tokens, class_tokens = self.compiled.encode_with_class_token(pixels)
                encoded = EncodedImages(tokens.to(self.dtype), class_tokens)
        if label_images is not None and self.recogniser is not None:
            encoded = dataclasses.replace(encoded, labels=tuple(self.recogniser.labels(label_images)))
        return encoded

    def _label_images(self, pictures: list[Image.Image], resized: np.ndarray) -> np.ndarray | None:
        """The recogniser's input for `pictures` (None without one): `resized`, the model's own input, where the
        two are alike, else the pictures resized for it."""
        if self.recogniser is None or not pictures:
            return None
        return resized if shares_resize(self.transform) else LABEL_TRANSFORM.resize(pictures)

    def labels(self, images: Sequence[ImageSource]) -> list[tuple[Label, ...]]:
        """Each image's ImageNet labels alone, without captioning it (`caption.py --labels-only`)."""
        if self.recogniser is None:
            raise ValueError("this model file has no ImageNet recogniser (hub.py release --labels adds one)")
        return self.recogniser.labels(LABEL_TRANSFORM.resize([load_image(image) for image in images]))

    def _prefix_ids(self, config: DecodeConfig) -> list[int]:
        return self.tokenizer.encode(config.prefix.strip()) if config.prefix.strip() else []

    def with_memory(self, encoded: EncodedImages) -> tuple[EncodedImages, list[tuple[Neighbour, ...]]]:
        """For a retrieval model, `encoded` with the captions of each photo's nearest datastore photos appended
        (none, only padding, without a datastore), and those photos; else `encoded` unchanged."""
        images = encoded.tokens.shape[0]
        if self.model.memory is None or encoded.includes_memory:
            return encoded, [()] * images
        k, length = self.model.config.retrieval_k, self.model.config.retrieval_tokens
        found: list[tuple[Neighbour, ...]] = [()] * images
        if self.datastore is not None and encoded.class_tokens is not None and len(self.datastore) >= k:
            indices, similarity = self.datastore.nearest(encoded.class_tokens.float().cpu(), k)
            found = [
                tuple(
                    Neighbour(self.datastore.names[i], round(float(s), 4), self.datastore.captions[i][0])
                    for i, s in zip(row.tolist(), sims.tolist(), strict=True)
                )
                for row, sims in zip(indices, similarity, strict=True)
            ]
        captions = [[n.caption for n in row] if row else [""] * k for row in found]
        with torch.inference_mode():
            memory = memory_ids(captions, self.tokenizer, length).to(self.device)
            tokens = self.model.read_memory(encoded.tokens, memory)
        return dataclasses.replace(encoded, tokens=tokens, includes_memory=True), found

    def _caption(
        self, encoded: EncodedImages, config: DecodeConfig, attention: bool, generator: torch.Generator | None
    ) -> list[Caption]:
        encoded, neighbours = self.with_memory(encoded)
        prefix_ids = self._prefix_ids(config)
        if generator is None and config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        generation = decoding.generate(
            self.decoder, encoded.tokens, config, bos_token_id=bos, eos_token_id=eos, generator=generator,
            prefix_ids=prefix_ids, draft=self.draft,
        )  # fmt: skip
        familiarity = [None] * encoded.tokens.shape[0]
        if self.familiarity is not None and encoded.class_tokens is not None:
            familiarity = self.familiarity.familiarity(encoded.class_tokens).tolist()
        captions = []
        for image, familiar in enumerate(familiarity):
            known = {}
            if familiar is not None:
                known = {"familiarity": familiar, "unfamiliar": familiar < self.familiarity.flagged_share}
            ranked = []
            for rank in range(generation.sequences.shape[1]):
                caption = dataclasses.replace(self._ranked_caption(generation, image, rank, prefix_ids), **known)
                if attention:
                    caption = self._with_attention(caption, prefix_ids, encoded.tokens[image : image + 1])
                ranked.append(caption)
            captions.append(
                dataclasses.replace(
                    ranked[0],
                    alternatives=tuple(ranked[1:]),
                    neighbours=neighbours[image],
                    labels=encoded.labels[image] if encoded.labels else (),
                )
            )
        return captions

    def _ranked_caption(self, generation: decoding.Generation, image: int, rank: int, prefix_ids: list[int]) -> Caption:
        length = int(generation.lengths[image, rank])
        ids = generation.sequences[image, rank, :length].tolist()
        logprobs = generation.token_logprobs[image, rank, :length].tolist()
        confidence = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
        text = self.tokenizer.decode(prefix_ids + ids)
        return Caption(text, confidence, float(generation.scores[image, rank]), tuple(ids), tuple(logprobs))

    def _with_attention(self, caption: Caption, prefix_ids: list[int], image_tokens: Tensor) -> Caption:
        """Per word: the model's patch attention while predicting its tokens, averaged over those tokens."""
        ids = prefix_ids + [i for i in caption.token_ids if i != self.tokenizer.eos_token_id]
        if not ids:
            return dataclasses.replace(caption, attention=np.zeros((0, 1, 1), dtype=np.float32))
        inputs = torch.tensor([[self.tokenizer.bos_token_id, *ids[:-1]]], device=self.device)
        with torch.inference_mode():
            maps = self.model.patch_attention(inputs, image_tokens)[0]  # (T, gh, gw): position t predicts ids[t]
        words, groups = self.tokenizer.words(ids)
        attention = torch.stack([maps[group].mean(0) for group in groups])
        return dataclasses.replace(caption, words=tuple(words), attention=attention.float().cpu().numpy())


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.endswith((".pt", ".safetensors"))
