"""Load any radiograph file (or upload) as an 8-bit RGB PIL image, or say clearly why not.

Conversions made by :func:`to_rgb8`:

* 8-bit grey (``L``, ``1``) and ``CMYK``/``YCbCr``/``LAB``/``HSV`` -> RGB through PIL.
* 16/32-bit grey (``I;16*``, ``I``) -> 8-bit by the image's *bit range*: values are divided by
  ``2**bits - 1`` where ``bits`` is the smallest depth (8 to 16, or more for ``I``) holding the
  largest value. A 12-bit radiograph stored in 16 bits thus fills the 8-bit range instead of
  turning almost black, and there is no per-image contrast stretch (nor clipping at 255).
  Float images (``F``) are min-max scaled.
* Transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent index) is composited onto
  **black**: a radiograph's surroundings are black, so a transparent margin looks like the film edge.
* EXIF orientation is applied (phone photos of a film are often rotated by a tag, not in pixels).

:func:`inspect_image` is the cheap check a dataset build runs on every file (header and last bytes).

Every failure raises :class:`ImageLoadError` naming the file: not an image, zero bytes, truncated
(the whole file is decoded; ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on), or more
pixels than ``max_pixels`` (checked on the header, before decoding).

One pixel limit: ``max_pixels`` (``MedcapConfig.max_image_pixels``) is the only one these functions apply,
with one message. Pillow's own decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by
default) is held off while a header is read, so it can neither refuse an image below ``max_pixels`` nor
answer first with its own number; :func:`use_pixel_limit` sets it to the same limit for every other
Pillow decode in the process (the notebooks and the demo call it with the config's value).
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medcap_helpers.errors import ImageLoadError

DEFAULT_MAX_PIXELS = 50_000_000
_GREY_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_NATIVE_RGB_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
_END_MARKERS = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}
_TAIL_BYTES = 1024
_PILLOW_LIMIT_LOCK = threading.Lock()
_PILLOW_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


def use_pixel_limit(max_pixels: int) -> None:
    """Make Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) the same limit as ours,
    for every Pillow decode in this process (a dataset's, a plot's)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image (see module docstring for the conversions)."""
    path = _non_empty_file(path)
    with open(path, "rb") as handle:
        return _decode(handle, str(path), max_pixels)


def _non_empty_file(path: str | Path) -> Path:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageLoadError(f"{path}: cannot read the file ({err.strerror or err}).") from None
    if size == 0:
        raise ImageLoadError(f"{path}: the file is empty (0 bytes).")
    return path


def load_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Like :func:`load_image` for bytes already in memory (an upload); ``name`` is used in errors."""
    if not data:
        raise ImageLoadError(f"{name}: the file is empty (0 bytes).")
    return _decode(io.BytesIO(data), name, max_pixels)


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says (see :func:`inspect_image`)."""

    width: int
    height: int
    mode: str
    format: str | None
    has_transparency: bool

    @property
    def converts_natively(self) -> bool:
        """True when PIL's ``convert("RGB")`` gives the same pixels as :func:`to_rgb8`.

        Not for 16/32-bit grey (PIL clips it at 255) nor transparency (PIL drops alpha, keeping
        whatever colour lies under it, instead of compositing on black).
        """
        return self.mode in _NATIVE_RGB_MODES and not self.has_transparency


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Cheap check of a file (header and last bytes, no decoding) or :class:`ImageLoadError`.

    Finds missing, empty, non-image and oversized files, and PNG/JPEG files cut short (no ``IEND`` /
    end-of-image marker at the end). Damage inside the data needs a full decode (:func:`load_image`).
    """
    path = _non_empty_file(path)
    with open(path, "rb") as handle, _open_image(handle, str(path), max_pixels) as image:
        info = ImageInfo(image.width, image.height, image.mode, image.format,
                         "transparency" in image.info or image.mode in _ALPHA_MODES)
        handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
        tail = handle.read()
    end_marker = _END_MARKERS.get(info.format or "")
    if end_marker is not None and end_marker not in tail:
        raise ImageLoadError(f"{path}: the file is truncated (no {info.format} end marker); "
                             "download or copy it again.")
    return info


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (transparency onto black)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _GREY_WIDE_MODES:
        return _wide_grey_to_rgb(np.asarray(image))
    if mode == "F":
        return _float_grey_to_rgb(np.asarray(image, dtype=np.float64))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" else "RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(handle: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    with _open_image(handle, name, max_pixels) as image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                upright = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # a frame or tile bigger than the header said (GIF, TIFF, ICO ...), caught by Pillow's guard
            found = _PILLOW_PIXELS_RE.search(str(err))
            raise ImageLoadError(_too_many_pixels(name, int(found.group(1)) if found else None,
                                                  max_pixels)) from None
        except MemoryError:
            raise ImageLoadError(f"{name}: not enough memory to decode this image.") from None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad data
            raise ImageLoadError(f"{name}: the image data is damaged or truncated ({_reason(err)}).") from None
        return to_rgb8(upright if upright is not None else image).copy()


@contextmanager
def _open_image(handle: IO[bytes], name: str, max_pixels: int) -> Iterator[Image.Image]:
    """``Image.open`` (the header only) that turns PIL's errors into :class:`ImageLoadError` naming the
    file, then the pixel check at ``max_pixels``, the one limit (see the module docstring)."""
    try:
        with _PILLOW_LIMIT_LOCK:
            pillow_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # reading a header decodes nothing; _check_pixels guards below
            try:
                image = Image.open(handle)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image (or a format Pillow cannot read); "
                             "use a PNG or JPEG radiograph.") from None
    except Exception as err:
        raise ImageLoadError(f"{name}: cannot read the image header ({_reason(err)}).") from None
    try:
        _check_pixels(image, name, max_pixels)
        yield image
    finally:
        image.close()


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: the header gives an empty size {width}x{height}.")
    if width * height > max_pixels:
        raise ImageLoadError(_too_many_pixels(name, width * height, max_pixels, f"{width}x{height}"))


def _too_many_pixels(name: str, pixels: int | None, max_pixels: int, size: str | None = None) -> str:
    """The one message for an image over the pixel limit."""
    count = f"{size} = {pixels:,} pixels" if size and pixels else f"{pixels:,} pixels" if pixels else "the image"
    return (f"{name}: {count} is more than the limit of {max_pixels:,} pixels (max_image_pixels); "
            "downscale the image or raise the limit.")


def _wide_grey_to_rgb(values: np.ndarray) -> Image.Image:
    values = values.astype(np.int64)
    low = int(values.min()) if values.size else 0
    if low < 0:  # signed 32-bit data: shift so the darkest pixel is 0
        values = values - low
    high = int(values.max()) if values.size else 0
    bits = max(8, high.bit_length())
    scaled = np.round(values * (255.0 / ((1 << bits) - 1))).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _float_grey_to_rgb(values: np.ndarray) -> Image.Image:
    values = np.nan_to_num(values)
    low, high = float(values.min()), float(values.max())
    span = high - low or 1.0
    scaled = np.round((values - low) * (255.0 / span)).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


__all__ = ["DEFAULT_MAX_PIXELS", "ImageInfo", "ImageLoadError", "inspect_image", "load_image", "load_image_bytes",
           "to_rgb8", "use_pixel_limit"]


def open_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, an HxWxC/HxW array, or an image as ``datasets`` stores it
    undecoded (``{"bytes": ..., "path": ...}``)."""
    if isinstance(image, dict):
        if image.get("bytes"):
            with Image.open(io.BytesIO(image["bytes"])) as opened:
                return opened.convert("RGB")
        image = image.get("path")
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Image file '{path}' does not exist.")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    if hasattr(image, "__array__"):
        return Image.fromarray(np.asarray(image)).convert("RGB")
    raise TypeError(f"Expected a PIL image, a path or an array, got {type(image).__name__}.")
