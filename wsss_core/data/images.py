"""Reading photos safely: a pixel limit, EXIF orientation, 16-bit greyscale, one-line errors.

Every image the pipeline reads goes through `read_rgb` (or `image_size` to learn its size
cheaply), so all stages and `wsss predict` agree on how a file becomes pixels:

- images over `max_pixels` (width x height) are refused before decoding, and so is anything
  Pillow flags as a decompression bomb;
- the EXIF orientation tag is applied (a phone photo taken upright is read upright);
- 16-bit greyscale PNGs are scaled to 8 bits (Pillow's convert('RGB') would clip them to white);
  32-bit integer and float images are refused, as their value range is unknown.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from wsss_core.errors import DataError

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_TEXT_BYTES = 64 * 2**20  # list, class and labels files larger than this are refused (data.files)
"""Largest width x height read by default: a 12 MP phone photo passes, a 12000 x 12000 scan does not."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UNSUPPORTED_MODES = ("I", "F")
# EXIF orientations 5-8 turn the image by 90 degrees, so width and height swap.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(image: Image.Image) -> int:
    """Return the EXIF orientation tag (1 = upright, also when there is no EXIF)."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block: read the pixels as stored
        return 1


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open (lazily, no pixel decoded yet) and refuse a missing, corrupt or too large image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: refused as a possible decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable or corrupt image ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise DataError(f"{path}: {width}x{height} image has {width * height:,} pixels, over the limit of "
                        f"{max_pixels:,} (downscale it or raise the max-pixels limit)")
    if image.mode in UNSUPPORTED_MODES:
        image.close()
        raise DataError(f"{path}: {image.mode!r} images (32-bit integer or float) are not supported; "
                        "save it as 8-bit RGB or 16-bit greyscale")
    return image


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Return (width, height) of the image as `read_rgb` returns it (EXIF orientation applied)."""
    with _open_checked(Path(path), max_pixels) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in TRANSPOSING_ORIENTATIONS else (width, height)


def read_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = False) -> np.ndarray:
    """Return the image at path as uint8 [H, W, 3] RGB, upright; any problem is a one-line DataError.

    draft=True lets JPEGs decode at 1/8 scale (enough to prove the file decodes; the array is then small).
    """
    path = Path(path)
    with _open_checked(path, max_pixels) as image:
        try:
            if draft:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            upright = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
            if upright.mode in SIXTEEN_BIT_MODES:
                pixels = np.asarray(upright).astype(np.uint32)
                grey = ((pixels * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(upright.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path}: unreadable or corrupt image ({err})") from None
