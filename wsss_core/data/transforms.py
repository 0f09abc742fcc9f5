"""Image transforms for classifier training and inference (numpy in, torch out)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_long_side(image: np.ndarray, long_side: int, resample=Image.BILINEAR) -> np.ndarray:
    """Return image [H, W, ...] resized so that max(H, W) == long_side, keeping the aspect."""
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample))


def normalize(image: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """Return uint8 [H, W, 3] as a float32 tensor [3, H, W] with (x/255 - mean) / std."""
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def crop_windows(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Return (source, target) (rows, cols) slices of a random size x size crop of an H x W image.

    Where a side is shorter than size, the whole side is placed at a random offset in the crop.
    """
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    out_top, out_left = int(rng.integers(0, size - crop_h + 1)), int(rng.integers(0, size - crop_w + 1))
    return ((slice(top, top + crop_h), slice(left, left + crop_w)),
            (slice(out_top, out_top + crop_h), slice(out_left, out_left + crop_w)))


def random_crop(tensor: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Return a [C, size, size] crop, zero-padding (the mean after normalising) a smaller side."""
    channels, height, width = tensor.shape
    out = tensor.new_zeros(channels, size, size)
    source, target = crop_windows(height, width, size, rng)
    out[(slice(None), *target)] = tensor[(slice(None), *source)]
    return out


class TrainAugment:
    """IRN's classifier augmentation: random long-side rescale, flip, normalise, random crop."""

    def __init__(self, resize_long: tuple[int, int], crop_size: int, mean: tuple, std: tuple):
        self.resize_long, self.crop_size, self.mean, self.std = resize_long, crop_size, mean, std

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Return an augmented float32 tensor [3, crop_size, crop_size]."""
        image = resize_long_side(image, int(rng.integers(self.resize_long[0], self.resize_long[1] + 1)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return random_crop(normalize(image, self.mean, self.std), self.crop_size, rng)
