"""The training cache of frozen encoder work: the encoder's tokens after its frozen first blocks, per image.

With the first blocks frozen, their output never changes during training, so it is computed once per image (and
per mirror image) and kept on disk; each epoch then runs only the trainable blocks.
"""

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import CaptionedImage, read_image_file
from files import atomic_write
from images import ImageError, ImageTransform, load_image
from model import CaptionModel

logger = logging.getLogger(__name__)


class FeatureCache:
    """The encoder's tokens after its frozen first blocks, stored per image (and per mirror image) on disk.

    Entries live under a folder named by a hash of everything that determines them: the frozen weights, the
    preprocessing and the number of frozen blocks; each entry is named by a hash of the image's bytes. Entries are
    written atomically, so an interrupted fill resumes where it stopped, and a damaged entry is recomputed.
    """

    def __init__(self, root: str | os.PathLike, model: CaptionModel, frozen_blocks: int):
        self.model = model
        self.frozen_blocks = frozen_blocks
        self.transform = ImageTransform.for_model(model.config)
        self.directory = Path(root) / self._key()
        self._hashes: dict[Path, str] = {}  # image path -> hash of its bytes, filled by `fill`

    def _key(self) -> str:
        digest = hashlib.sha256()
        digest.update(repr((self.model.config.encoder, self.transform, self.frozen_blocks)).encode())
        for name, tensor in self.model.encoder.frozen_state(self.frozen_blocks).items():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:20]

    def _entry(self, image_hash: str) -> Path:
        return self.directory / image_hash[:2] / f"{image_hash}.safetensors"

    def fill(self, items: list[CaptionedImage], *, batch_size: int = 16, flips: bool = False) -> list[int]:
        """Compute the missing entries; returns the indices of the items that are usable (readable images)."""
        device = next(self.model.parameters()).device
        usable, pending = [], []
        for index, item in enumerate(tqdm(items, desc="hashing images", unit="img", leave=False)):
            data = read_image_file(item.image)
            if data is None:
                continue
            image_hash = hashlib.sha256(data).hexdigest()
            self._hashes[item.image] = image_hash
            if self._valid(self._entry(image_hash), flips):
                usable.append(index)
            else:
                pending.append((index, data, image_hash))
        progress = tqdm(total=len(pending), desc="caching encoder tokens", unit="img", disable=not pending)
        for start in range(0, len(pending), batch_size):
            batch = []
            for index, data, image_hash in pending[start : start + batch_size]:
                try:
                    batch.append((index, load_image(data), image_hash))
                except ImageError as error:
                    logger.warning("skipping %s: %s", items[index].image, error)
            if batch:
                pictures = [picture for _, picture, _ in batch]
                variants = {"tokens": self.transform(pictures)}
                if flips:
                    variants["flipped"] = self.transform(pictures, flip=[True] * len(pictures))
                with torch.inference_mode():
                    encoded = {
                        name: self._frozen_tokens(pixels.to(device)).half().cpu() for name, pixels in variants.items()
                    }
                for row, (index, _, image_hash) in enumerate(batch):
                    tensors = {name: values[row].contiguous() for name, values in encoded.items()}
                    self._write(self._entry(image_hash), tensors)
                    usable.append(index)
            progress.update(len(pending[start : start + batch_size]))
        progress.close()
        return sorted(usable)

    def _frozen_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.encoder
        return encoder.blocks(encoder.stem(pixels), 0, self.frozen_blocks)

    def _valid(self, entry: Path, flips: bool) -> bool:
        if not entry.is_file():
            return False
        try:
            tensors = load_file(entry)
        except (SafetensorError, OSError):
            logger.warning("recomputing damaged cache entry %s", entry)
            return False
        return "tokens" in tensors and (not flips or "flipped" in tensors)

    @staticmethod
    def _write(entry: Path, tensors: dict[str, torch.Tensor]) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(entry, lambda temporary: save_file(tensors, temporary))

    def load(self, items: list[CaptionedImage], variant: str = "tokens") -> torch.Tensor:
        """Stacked tokens (len(items), N, C) in float16 for items already filled."""
        return torch.stack([load_file(self._entry(self._hashes[item.image]))[variant] for item in items])
