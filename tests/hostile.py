"""A corpus of hostile and awkward inputs, generated on demand so that nothing large is committed.

Each case is (name, bytes, expectation): "error" inputs must raise `ImageError` with a message containing the
given text; "ok" inputs must load as an RGB image.
"""

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    outcome: str  # "ok" or "error"
    message: str = ""  # part of the error message, for "error" cases


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims an enormous size: a decompression bomb's calling card."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


TOO_LARGE = r"too large: over the limit of \d+ megapixels"  # the app's limit is lower than the command line's


def cases() -> list[Case]:
    photo = _photo()
    jpeg, png = _encode(photo, "JPEG", quality=90), _encode(photo, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    animated = io.BytesIO()
    _photo(32, 32, 1).save(animated, format="GIF", save_all=True, append_images=[_photo(32, 32, 2)], duration=100)
    palette_transparent = photo.convert("P")
    palette_transparent.info["transparency"] = 0
    sixteen_bit = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    bomb = Image.new("L", (10_000, 10_000))  # 100 megapixels of one colour: compresses to almost nothing
    return [
        Case("empty.jpg", b"", "error", "empty"),
        Case("truncated.jpg", jpeg[: len(jpeg) // 3], "error", "corrupt or truncated"),
        Case("truncated.png", png[: len(png) // 2], "error", "corrupt or truncated"),
        Case("header-only.jpg", jpeg[:20], "error", ""),
        Case("text.jpg", b"hello, I am not a picture\n" * 20, "error", "not an image format"),
        Case(
            "page.png",
            b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
            "error",
            "not an image",
        ),
        Case(
            "drawing.svg",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
            "error",
            "not an image",
        ),
        Case("script.gif", b"GIF89a<script>alert(1)</script>", "error", ""),
        Case("random.bin", np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "error", ""),
        Case("zeros.png", b"\x00" * 1000, "error", "not an image"),
        Case("claims-huge.png", _png_claiming(100_000, 100_000), "error", TOO_LARGE),
        Case("bomb.png", _encode(bomb, "PNG"), "error", TOO_LARGE),
        Case("zero-size.png", _png_claiming(0, 10), "error", ""),
        Case("wrong-extension.png", jpeg, "ok"),  # a JPEG named .png
        Case("photo.jpg", jpeg, "ok"),
        Case("one-pixel.png", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
        Case("strip.png", _encode(Image.new("RGB", (10_000, 1), (0, 90, 200)), "PNG"), "ok"),
        Case("tall-strip.png", _encode(Image.new("L", (1, 10_000), 128), "PNG"), "ok"),
        Case("sixteen-bit.png", _encode(sixteen_bit, "PNG"), "ok"),
        Case("cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG"), "ok"),
        Case("rgba.png", _encode(photo.convert("RGBA"), "PNG"), "ok"),
        Case("palette-transparent.png", _encode(palette_transparent, "PNG", transparency=0), "ok"),
        Case("grayscale.jpg", _encode(photo.convert("L"), "JPEG"), "ok"),
        Case("black-and-white.png", _encode(photo.convert("1"), "PNG"), "ok"),
        Case("exif-rotated.jpg", _encode(photo, "JPEG", exif=exif), "ok"),
        Case("animated.gif", animated.getvalue(), "ok"),
        Case("webp.webp", _encode(photo, "WEBP"), "ok"),
        Case("bmp.bmp", _encode(photo, "BMP"), "ok"),
        Case("tiff.tif", _encode(photo, "TIFF"), "ok"),
    ]
