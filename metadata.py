"""Captions inside image files, for people who caption photo libraries and training sets.

The caption goes where photo tools look for a description: EXIF ImageDescription and XMP dc:description (JPEG, PNG,
WebP), and for PNG also its own "Description" text chunk. pyexiv2 (Exiv2) rewrites only the metadata blocks: the
compressed pixels and every other tag are kept byte for byte, where re-saving with Pillow would re-encode a JPEG.
"""

import os
from pathlib import Path

import pyexiv2

from checkpoint import atomic_write

EMBEDDABLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
_EXIF_DESCRIPTION = "Exif.Image.ImageDescription"
_XMP_DESCRIPTION = "Xmp.dc.description"
_DEFAULT_LANGUAGE = 'lang="x-default"'

pyexiv2.set_log_level(4)  # Exiv2's own warnings would interleave with our output; failures still raise


class MetadataError(ValueError):
    """An image whose metadata cannot be read or written; the message names the file."""


def read_description(path: str | os.PathLike) -> str:
    """The description already in an image file (EXIF, else XMP), or "" where it has none."""
    name = os.fspath(path)
    try:
        with pyexiv2.ImageData(Path(name).read_bytes()) as image:
            exif = image.read_exif().get(_EXIF_DESCRIPTION, "")
            xmp = image.read_xmp().get(_XMP_DESCRIPTION, "")
    except (OSError, RuntimeError, UnicodeDecodeError) as error:
        raise MetadataError(f"{name}: cannot read its metadata ({error})") from error
    if isinstance(xmp, dict):  # a language alternative: {'lang="x-default"': text, ...}
        xmp = xmp.get(_DEFAULT_LANGUAGE) or next(iter(xmp.values()), "")
    return (exif or xmp or "").strip()


def embed_description(source: str | os.PathLike, text: str, destination: str | os.PathLike | None = None) -> None:
    """Write `text` as the description of the image at `source`, into `destination` (default: `source` itself).

    The file is replaced atomically and keeps its permissions; a failure leaves it as it was.
    """
    name = os.fspath(source)
    if Path(name).suffix.lower() not in EMBEDDABLE_SUFFIXES:
        raise MetadataError(f"{name}: captions can be embedded in JPEG, PNG and WebP files only (use --sidecar)")
    try:
        with pyexiv2.ImageData(Path(name).read_bytes()) as image:
            image.modify_exif({_EXIF_DESCRIPTION: text})
            image.modify_xmp({_XMP_DESCRIPTION: {_DEFAULT_LANGUAGE: text}})
            if Path(name).suffix.lower() == ".png":
                image.modify_comment(text)  # PNG's own Description text chunk
            data = image.get_bytes()
    except (OSError, RuntimeError) as error:
        raise MetadataError(f"{name}: cannot write its metadata ({error})") from error
    target = os.fspath(destination if destination is not None else source)
    mode = os.stat(name).st_mode & 0o7777

    def write(temporary: str) -> None:
        Path(temporary).write_bytes(data)
        os.chmod(temporary, mode)

    atomic_write(target, write)
