"""Captions inside image files, for people who caption photo libraries and training sets.

The caption goes where photo tools look for a description: XMP dc:description (JPEG, PNG, WebP; the authoritative
copy, in UTF-8), EXIF ImageDescription where the caption is plain ASCII (the EXIF standard's type for it: other text
is left out of EXIF rather than garbled, and an older EXIF description is removed), for PNG also its own
"Description" text chunk, and the IPTC Caption-Abstract where the file already has one, so that a file never holds
two different captions. pyexiv2 (Exiv2) rewrites only the metadata blocks: the compressed pixels and every other
tag are kept byte for byte, where re-saving with Pillow would re-encode a JPEG. Keywords (a photo's ImageNet labels,
`caption.py --keywords`) go into XMP dc:subject and IPTC Keywords, where dataset-tagging and photo tools read them.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import pyexiv2

from files import atomic_write

EMBEDDABLE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
_EXIF_DESCRIPTION = "Exif.Image.ImageDescription"
_XMP_DESCRIPTION = "Xmp.dc.description"
_IPTC_CAPTION = "Iptc.Application2.Caption"
_XMP_KEYWORDS = "Xmp.dc.subject"
_IPTC_KEYWORDS = "Iptc.Application2.Keywords"
_DEFAULT_LANGUAGE = 'lang="x-default"'

pyexiv2.set_log_level(4)  # Exiv2's own warnings would interleave with our output; failures still raise


class MetadataError(ValueError):
    """An image whose metadata cannot be read or written; the message names the file."""


def read_description(path: str | os.PathLike) -> str:
    """The description already in an image file, from any field this module reads or writes (XMP, EXIF, IPTC, PNG
    text), or "" where it has none."""
    name = os.fspath(path)
    try:
        with pyexiv2.ImageData(Path(name).read_bytes()) as image:
            xmp = image.read_xmp().get(_XMP_DESCRIPTION, "")
            exif = image.read_exif().get(_EXIF_DESCRIPTION, "")
            iptc = image.read_iptc().get(_IPTC_CAPTION, "")
            png_text = image.read_comment() if Path(name).suffix.lower() == ".png" else ""
    except (OSError, RuntimeError, UnicodeDecodeError) as error:
        raise MetadataError(f"{name}: cannot read its metadata ({error})") from error
    if isinstance(xmp, dict):  # a language alternative: {'lang="x-default"': text, ...}
        xmp = xmp.get(_DEFAULT_LANGUAGE) or next(iter(xmp.values()), "")
    if isinstance(iptc, list):  # a repeatable IPTC field
        iptc = " ".join(iptc)
    return next((text.strip() for text in (xmp, exif, iptc, png_text) if text and text.strip()), "")


def read_keywords(path: str | os.PathLike) -> list[str]:
    """The keywords in an image file's XMP dc:subject (where this module writes them), or IPTC Keywords."""
    name = os.fspath(path)
    try:
        with pyexiv2.ImageData(Path(name).read_bytes()) as image:
            keywords = image.read_xmp().get(_XMP_KEYWORDS) or image.read_iptc().get(_IPTC_KEYWORDS) or []
    except (OSError, RuntimeError, UnicodeDecodeError) as error:
        raise MetadataError(f"{name}: cannot read its metadata ({error})") from error
    return [keywords] if isinstance(keywords, str) else list(keywords)


def embed_description(
    source: str | os.PathLike,
    text: str,
    destination: str | os.PathLike | None = None,
    keywords: Sequence[str] = (),
) -> None:
    """Write `text` as the description of the image at `source`, and `keywords` (where given) as its XMP dc:subject
    and IPTC Keywords, into `destination` (default: `source` itself).

    The file is replaced atomically (a symbolic link is followed and kept) and keeps its permissions; a failure
    leaves it as it was.
    """
    name = os.fspath(source)
    suffix = Path(name).suffix.lower()
    if suffix not in EMBEDDABLE_SUFFIXES:
        raise MetadataError(f"{name}: captions can be embedded in JPEG, PNG and WebP files only (use --sidecar)")
    try:
        with pyexiv2.ImageData(Path(name).read_bytes()) as image:
            _write_description(image, text, suffix)
            if keywords:
                image.modify_xmp({_XMP_KEYWORDS: list(keywords)})
                if keywords_fit_iptc(keywords):
                    image.modify_iptc({_IPTC_KEYWORDS: list(keywords)})
            data = image.get_bytes()
    except (OSError, RuntimeError, UnicodeDecodeError) as error:
        raise MetadataError(f"{name}: cannot write its metadata ({error})") from error
    atomic_write(
        destination if destination is not None else source, lambda temporary: Path(temporary).write_bytes(data)
    )


def keywords_fit_iptc(keywords: Sequence[str]) -> bool:
    """IPTC Keywords hold at most 64 bytes each; XMP alone carries longer ones."""
    return all(len(keyword.encode()) <= 64 for keyword in keywords)


def _write_description(image: pyexiv2.ImageData, text: str, suffix: str) -> None:
    image.modify_xmp({_XMP_DESCRIPTION: {_DEFAULT_LANGUAGE: text}})
    image.modify_exif({_EXIF_DESCRIPTION: text if text.isascii() else None})
    if _IPTC_CAPTION in image.read_iptc():
        image.modify_iptc({_IPTC_CAPTION: text})
    if suffix == ".png":
        image.modify_comment(text)  # PNG's own Description text chunk
