"""VOC colour map and palette-PNG I/O for label maps (0 background, 1..K classes, 255 void)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wsss_core.errors import DataError

VOID = 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """Return the PASCAL VOC colour map as uint8 [n, 3] (index 255 is (224, 224, 192))."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        label, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        cmap[index] = (r, g, b)
    return cmap


VOC_PALETTE = voc_colormap()


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """Write an [H, W] uint8 label map as a palette PNG with the VOC colour map."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {labels.shape}")
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(VOC_PALETTE.flatten().tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG and return its indices as uint8 [H, W] (palette indices, not colours)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DataError(f"{path}: label PNG must be palette or greyscale, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable label PNG ({err})") from None


def colorize(labels: np.ndarray) -> np.ndarray:
    """Return the VOC colours of an [H, W] label map as uint8 [H, W, 3]."""
    return VOC_PALETTE[np.asarray(labels, dtype=np.uint8)]
