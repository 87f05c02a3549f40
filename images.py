"""Reading images from users, safely, and turning them into encoder input.

Everything a user hands us passes through `load_image`: file paths, bytes, PIL images and numpy arrays in any mode
(RGBA, palette, grayscale, 16-bit, CMYK, EXIF-rotated, animated). Anything unusable raises `ImageError` with a
message meant for that user; nothing else escapes.
"""

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from config import ModelConfig

# The cap keeps one image from exhausting memory. Pillow itself refuses images above 89.5 megapixels as possible
# decompression bombs; ours sits just below, so that the limit a user meets is always this one, stated.
MAX_PIXELS = 89_000_000
MAX_FILE_BYTES = 100 * 1024 * 1024

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input that cannot be used as an image; the message says why, for the user."""


def load_image(
    source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None, name: str = "image data"
) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an array (H, W[, C]).

    Transparent pixels are composited onto white, 16-bit and float images are scaled to 8 bits, EXIF orientation is
    applied and only the first frame of an animation is used. Images of more than `max_pixels` are refused before
    they are decoded. With `max_side`, a file is decoded at no more than that many pixels a side where the format
    allows (JPEG: at 1/2, 1/4 or 1/8 scale) and reduced to fit it straight after, before any copy is made: a server
    then holds what it shows, not the camera's full frame. `name` is what errors call encoded bytes (where they
    came from).

    Raises:
        ImageError: the source is missing, empty, not an image, truncated, or too large.
    """
    if isinstance(source, np.ndarray):
        return _to_rgb(_from_array(source))
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        name, data = os.fspath(source), _read_file(source)
    else:
        raise ImageError(f"expected an image file, bytes, PIL image or array, got {type(source).__name__}")
    if not data:
        raise ImageError(f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(name, image.size, max_pixels)
            if max_side is not None:
                image.draft("RGB", (max_side, max_side))
            image.load()
            if max_side is not None and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            return _to_rgb(image)
    except ImageError:
        raise
    except (UnidentifiedImageError, SyntaxError) as error:
        raise ImageError(f"{name}: not an image format this tool reads (JPEG, PNG, GIF, WebP, BMP, TIFF)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        limit = min(max_pixels, MAX_PIXELS) // 1_000_000  # Pillow's own limit is above MAX_PIXELS
        raise ImageError(f"{name}: image is too large: over the limit of {limit} megapixels") from error
    except (OSError, ValueError, EOFError) as error:
        raise ImageError(f"{name}: the image is corrupt or truncated ({error})") from error


def load_each(
    sources: Sequence[ImageSource], load: Callable[[ImageSource], Image.Image] = load_image
) -> list[Image.Image | ImageError]:
    """`load` (by default `load_image`) for each source, in order, with the `ImageError` in place of an image that
    cannot be used."""
    loaded: list[Image.Image | ImageError] = []
    for source in sources:
        try:
            loaded.append(load(source))
        except ImageError as error:
            loaded.append(error)
    return loaded


def _read_file(path: str | os.PathLike) -> bytes:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ImageError(f"{name}: is a folder, not an image file")
    try:
        size = os.path.getsize(name)
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: file is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB")
        with open(name, "rb") as file:
            return file.read()
    except FileNotFoundError as error:
        raise ImageError(f"{name}: no such file") from error
    except PermissionError as error:
        raise ImageError(f"{name}: permission denied") from error
    except OSError as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from error


def _check_size(name: str, size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        limit = max_pixels // 1_000_000
        raise ImageError(f"{name}: image is too large: {width}×{height} pixels, over the limit of {limit} megapixels")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"array of shape {array.shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4)")
    _check_size("array", (array.shape[1], array.shape[0]))
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("array image contains NaN or infinite values")
        # Floats are taken as 0..1 intensities, the convention of numpy image libraries.
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"array of dtype {array.dtype} is not an image; expected uint8, uint16, float or bool")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    _check_size("image", image.size)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array / peak, 0.0, 1.0) * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True, slots=True)
class ImageTransform:
    """Resize to the encoder's square input and normalise with its mean and std.

    The whole image is resized, not centre-cropped: the training photos (Flickr8k) were squashed to a square, so a
    squashed photo is what the model knows, and a crop would cut off the subject of wide pictures.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, images: list[Image.Image], *, flip: list[bool] | None = None) -> torch.Tensor:
        """Pixel values (B, 3, size, size) for RGB `images`; `flip[i]` mirrors image i left to right."""
        return self.normalize(self.resize(images, flip=flip))

    def resize(self, images: list[Image.Image], *, flip: list[bool] | None = None) -> np.ndarray:
        """The resized (and flipped) images as one uint8 array (B, size, size, 3): Pillow and NumPy only, so a
        reader thread can run it beside the model without starting a second pool of torch threads."""
        arrays = []
        for index, image in enumerate(images):
            resized = image.resize((self.size, self.size), _RESAMPLING[self.interpolation])
            if flip is not None and flip[index]:
                resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arrays.append(np.asarray(resized, dtype=np.uint8))
        return np.stack(arrays)

    def normalize(self, resized: np.ndarray) -> torch.Tensor:
        """`resize`'s array as the model's normalised pixel values (B, 3, size, size), float32."""
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @classmethod
    def for_model(cls, config: ModelConfig) -> "ImageTransform":
        """The transform a model was built with (its config carries the encoder's resolved preprocessing)."""
        return cls(config.image_size, config.image_mean, config.image_std, config.image_interpolation)
