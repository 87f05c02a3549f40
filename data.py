"""Caption data sets: reading the four layouts users have.

Layouts (`load_captions` tells them apart):
1. a folder with ``captions.csv`` (columns image, caption, split) and an ``images/`` folder (our Flickr8k copy);
2. a COCO-style captions JSON (``images`` + ``annotations``), images beside it or in an ``images/`` folder;
3. the Flickr8k release: ``Flickr8k.token.txt`` plus ``Flickr_8k.{train,dev,test}Images.txt`` split lists;
4. a folder of images, each with a same-named ``.txt`` file of captions, one per line (captioning-tool format);
   sub-folders named train/val/test give the splits, otherwise every image is in ``train``.
"""

import csv
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


class DataError(ValueError):
    """A data set that cannot be used; raised before training starts."""


@dataclass(frozen=True)
class CaptionedImage:
    image: Path
    captions: tuple[str, ...]


def clean_caption(text: str) -> str:
    """One line of plain text: whitespace collapsed, the sentence-final ' .' of Flickr/COCO captions dropped."""
    text = " ".join(text.split())
    return re.sub(r"\s*[.]+$", "", text)


def load_captions(path: str | os.PathLike) -> dict[str, list[CaptionedImage]]:
    """Every split of the data set at `path`, by split name, images in a stable order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".json":
        pairs = _read_coco(path)
    elif path.is_file() and path.suffix == ".csv":
        pairs = _read_csv(path, path.parent / "images")
    elif (path / "captions.csv").is_file():
        pairs = _read_csv(path / "captions.csv", path / "images")
    elif (path / "Flickr8k.token.txt").is_file():
        pairs = _read_flickr_release(path)
    elif path.is_dir():
        pairs = _read_sidecar_folder(path)
    else:
        raise DataError(f"{path}: not a data set (expected a folder, a captions .csv or a COCO .json)")
    splits: dict[str, dict[Path, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, image, caption in pairs:
        caption = clean_caption(caption)
        if caption:
            splits[split][image].append(caption)
    return {
        split: [CaptionedImage(image, tuple(captions)) for image, captions in sorted(images.items())]
        for split, images in splits.items()
    }


def load_split(path: str | os.PathLike, split: str) -> list[CaptionedImage]:
    """One split; a missing or empty split is a `DataError` naming the splits that exist."""
    splits = load_captions(path)
    if not splits.get(split):
        found = ", ".join(f"{name} ({len(items)} images)" for name, items in sorted(splits.items())) or "none"
        raise DataError(f"{path}: no '{split}' split with captions (found: {found})")
    return splits[split]


def _split_name(value: str, source: str) -> str:
    name = _SPLIT_ALIASES.get(value.strip().lower())
    if name is None:
        raise DataError(f"{source}: unknown split {value!r} (expected train, val or test)")
    return name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); re-save it as UTF-8") from error


def _read_csv(csv_path: Path, image_dir: Path):
    text = _read_text(csv_path)
    reader = csv.DictReader(text.splitlines())
    missing = {"image", "caption", "split"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} (need image, caption, split)")
    for line, row in enumerate(reader, start=2):
        if row["image"] is None or row["caption"] is None:
            raise DataError(f"{csv_path}:{line}: too few fields")
        yield _split_name(row["split"] or "", f"{csv_path}:{line}"), image_dir / row["image"], row["caption"]


def _read_coco(json_path: Path):
    try:
        data = json.loads(_read_text(json_path))
        images = {entry["id"]: entry for entry in data["images"]}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{json_path}: not a COCO captions file ({error})") from error
    image_dir = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    default_split = next((split for alias, split in _SPLIT_ALIASES.items() if alias in json_path.stem.lower()), "train")
    for annotation in annotations:
        entry = images.get(annotation.get("image_id"))
        if entry is None:
            raise DataError(
                f"{json_path}: annotation {annotation.get('id')} names unknown image {annotation.get('image_id')}"
            )
        split = _split_name(entry["split"], str(json_path)) if "split" in entry else default_split
        yield split, image_dir / entry.get("filepath", "") / entry["file_name"], str(annotation.get("caption", ""))


def _read_flickr_release(folder: Path):
    split_of = {}
    for split, list_name in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        list_file = folder / f"Flickr_8k.{list_name}.txt"
        if list_file.is_file():
            split_of.update({name.strip(): split for name in _read_text(list_file).split() if name.strip()})
    if not split_of:
        raise DataError(f"{folder}: Flickr8k.token.txt without any Flickr_8k.*Images.txt split list")
    image_dir = folder / "Flicker8k_Dataset" if (folder / "Flicker8k_Dataset").is_dir() else folder / "images"
    for line in _read_text(folder / "Flickr8k.token.txt").splitlines():
        if "\t" not in line:
            continue
        key, caption = line.split("\t", 1)
        name = key.split("#", 1)[0]
        if name in split_of:
            yield split_of[name], image_dir / name, caption


def _read_sidecar_folder(folder: Path):
    for image in sorted(folder.rglob("*")):
        if image.suffix.lower() not in IMAGE_SUFFIXES or not image.is_file():
            continue
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            continue
        top = image.relative_to(folder).parts[0].lower() if len(image.relative_to(folder).parts) > 1 else ""
        split = _SPLIT_ALIASES.get(top, "train")
        for caption in _read_text(sidecar).splitlines():
            yield split, image, caption


def read_image_file(path: Path) -> bytes | None:
    """The file's bytes, or None (with a warning) when it cannot be read: training skips it."""
    try:
        return path.read_bytes()
    except OSError as error:
        logger.warning("skipping %s: %s", path, error.strerror or error)
        return None
