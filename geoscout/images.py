"""JPEG decoding shared by validation and extraction: one place decides what a good image is."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import GeoscoutError


class ImageError(GeoscoutError, ValueError):
    """An image that cannot be used: missing, empty, not a JPEG, truncated or corrupt."""


def _open(path: Path) -> Image.Image:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError("image file not found") from None
    except OSError as exc:  # e.g. a path through a file, or no permission
        raise ImageError(f"cannot read the image file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError("is a directory, not an image file")
    size = info.st_size
    if size == 0:
        raise ImageError("image file is empty (0 bytes)")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice PIL's MAX_IMAGE_PIXELS (PIL only warns below that)
        raise ImageError(f"image too large to decode safely: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image PIL can identify") from None
    except (OSError, SyntaxError) as exc:  # a header cut short fails here, before any pixel
        raise ImageError(f"corrupt or truncated JPEG header: {exc}") from None
    if img.format != "JPEG":
        img.close()
        raise ImageError(f"not a JPEG (found {img.format})")
    return img


def decode_rgb(path: Path) -> np.ndarray:
    """Fully decode a JPEG to (H, W, 3) uint8; truncation and corruption raise ImageError."""
    img = _open(Path(path))
    try:
        with img:
            # load() decodes every scan: Image.open alone only reads the header and misses truncation.
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated JPEG: {exc}") from None


def check_jpeg(path: Path) -> None:
    """Decode enough to prove the file is a whole JPEG, cheaply.

    draft() lets libjpeg scale by 1/8 in the DCT domain: every entropy-coded byte is still
    read (so truncation is still caught) while most of the pixel work is skipped.
    """
    img = _open(Path(path))
    try:
        with img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated JPEG: {exc}") from None
