"""Captions of the nearest photos, which a retrieval model reads beside the image (SmallCap, Ramos et al., CVPR 2023).

A datastore holds photos as unit-length embeddings (the encoder's class token) with their captions. For each photo
to caption, the `k` nearest entries by cosine similarity are found and one caption of each is read by the decoder's
cross-attention (`model.CaptionMemory`). The shipped model carries the training photos' datastore; a user adds
their own photos without training (`Datastore.from_folder`), and theirs outrank the shipped ones when about as
close. During training a photo never retrieves itself, so the model learns to use its neighbours, not to copy.
"""

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from data import DataError, load_captions
from files import atomic_write
from tokenizer import CaptionTokenizer

logger = logging.getLogger("retrieval")
CACHE_FOLDER = ".captioner-datastore"  # beside a user's photos: their embeddings, by model and by photo content

# A user's photo outranks a shipped one unless the shipped one is this much more similar (cosine): measured on val,
# photos of the same kind as the user's are within it of their nearest user photo and other photos mostly are not.
USER_MARGIN = 0.15


@dataclass(frozen=True)
class Datastore:
    """Photos as unit-length embeddings (N, C), each with its captions and where it came from."""

    embeddings: Tensor
    captions: tuple[tuple[str, ...], ...]
    names: tuple[str, ...]
    bonus: Tensor | None = None  # (N,) added to the similarity when ranking: the user's photos come first

    def __post_init__(self) -> None:
        if not (len(self.embeddings) == len(self.captions) == len(self.names)):
            raise ValueError("a datastore needs one embedding, caption list and name per photo")
        if any(not captions for captions in self.captions):
            raise ValueError("every photo of a datastore needs at least one caption")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, class_tokens: Tensor, captions: Sequence[Sequence[str]], names: Sequence[str]) -> "Datastore":
        return cls(unit(class_tokens), tuple(tuple(c) for c in captions), tuple(names))

    def with_priority(self, other: "Datastore", margin: float = USER_MARGIN) -> "Datastore":
        """This datastore's photos ranked `margin` higher than those of `other`, merged into one."""
        bonus = torch.cat([self._bonus() + margin, other._bonus()])
        return Datastore(
            torch.cat([self.embeddings, other.embeddings.to(self.embeddings.dtype)]),
            self.captions + other.captions,
            self.names + other.names,
            bonus,
        )

    def to_dict(self) -> dict:
        """For a model file's metadata (the embeddings in float16: 768 bytes a photo for ViT-S)."""
        return {
            "embeddings": self.embeddings.half(),
            "captions": [list(c) for c in self.captions],
            "names": list(self.names),
        }

    @classmethod
    def from_dict(cls, values: dict) -> "Datastore":
        captions = tuple(tuple(str(c) for c in row) for row in values["captions"])
        return cls(values["embeddings"].float(), captions, tuple(str(name) for name in values["names"]))

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, embed: Callable[[list[Path]], Tensor], model_key: str
    ) -> "Datastore":
        """A user's captioned photos: a folder of images with same-named .txt captions (the layout train.py reads,
        every split). `embed(paths)` gives their class tokens; they are cached in the folder's CACHE_FOLDER, keyed
        by `model_key` and by each photo's content, so only new or changed photos are embedded again."""
        try:
            items = [item for split in load_captions(folder).values() for item in split]
        except DataError as error:
            raise DataError(f"datastore {os.fspath(folder)}: {error}") from error
        if not items:
            raise DataError(f"datastore {os.fspath(folder)}: no photos with same-named .txt captions")
        hashes = [hashlib.sha256(item.image.read_bytes()).hexdigest() for item in items]
        cache_path = Path(folder) / CACHE_FOLDER / f"{model_key}.safetensors"
        cached = _read_cache(cache_path)
        missing = [i for i, digest in enumerate(hashes) if digest not in cached]
        if missing:
            for index, embedding in zip(missing, embed([items[i].image for i in missing]), strict=True):
                cached[hashes[index]] = embedding.float()
            _write_cache(cache_path, {digest: cached[digest] for digest in hashes})
        embeddings = torch.stack([cached[digest] for digest in hashes])
        names = [os.fspath(item.image) for item in items]
        return cls.build(embeddings, [item.captions for item in items], names)

    def _bonus(self) -> Tensor:
        return self.bonus if self.bonus is not None else torch.zeros(len(self))

    def nearest(self, queries: Tensor, k: int, exclude: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The `k` entries ranked first for each query (B, C): their indices (B, k) and cosine similarities (B, k),
        best first. `exclude[b]` (an entry index, or -1) is never returned for query b: a photo's own entry."""
        if len(self) < k + (exclude is not None):
            raise ValueError(f"the datastore holds {len(self)} photos; {k} neighbours are needed")
        similarity = unit(queries).float() @ self.embeddings.float().T  # (B, N); exact search, fast at 100k
        ranking = similarity + self._bonus() if self.bonus is not None else similarity.clone()
        if exclude is not None:
            rows = torch.arange(len(exclude))
            excluded = torch.tensor(list(exclude))
            keep = excluded >= 0
            ranking[rows[keep], excluded[keep]] = -torch.inf
        indices = ranking.topk(k, dim=1).indices
        return indices, similarity.gather(1, indices)


def _read_cache(path: Path) -> dict[str, Tensor]:
    try:
        return dict(load_file(path)) if path.is_file() else {}
    except (SafetensorError, OSError) as error:  # a damaged cache is only recomputed
        logger.warning("datastore cache %s unreadable (%s); embedding the photos again", path, error)
        return {}


def _write_cache(path: Path, embeddings: dict[str, Tensor]) -> None:
    try:
        atomic_write(path, lambda temporary: save_file({k: v.contiguous() for k, v in embeddings.items()}, temporary))
    except OSError as error:  # a read-only folder of photos still works, only slower next time
        logger.warning("cannot cache the datastore's embeddings in %s (%s)", path.parent, error.strerror or error)


def unit(vectors: Tensor) -> Tensor:
    return F.normalize(vectors.float(), dim=-1)


def memory_ids(captions: Sequence[Sequence[str]], tokenizer: CaptionTokenizer, length: int) -> Tensor:
    """Each row's captions as one fixed-length memory (B, len(captions[0]) * length): each caption's tokens cut to
    `length - 1`, then EOS, padded with EOS to `length`."""
    pad = tokenizer.eos_token_id
    rows = []
    for row in captions:
        ids: list[int] = []
        for caption in row:
            tokens = tokenizer.encode(caption)[: length - 1] + [tokenizer.eos_token_id]
            ids += tokens + [pad] * (length - len(tokens))
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)
