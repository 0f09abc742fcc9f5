"""Image transforms for classifier training and inference (numpy in, torch out)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from wsss_core.data.palette import VOID


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
    return _paste(tensor, size, crop_windows(*tensor.shape[1:], size, rng))


def _paste(tensor: torch.Tensor, size: int, windows: tuple[tuple[slice, slice], tuple[slice, slice]]) -> torch.Tensor:
    """Return [C, size, size] zeros with tensor's source window pasted at the target window."""
    source, target = windows
    out = tensor.new_zeros(tensor.shape[0], size, size)
    out[(slice(None), *target)] = tensor[(slice(None), *source)]
    return out


def joint_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Return a size x size crop of image [H,W,3] and labels [H,W], padding image with 0 and labels with 255."""
    image_out, labels_out, _ = crop_all(image, labels, None, crop_windows(*labels.shape, size, rng), size)
    return image_out, labels_out


def crop_all(image: np.ndarray, labels: np.ndarray, maps: np.ndarray | None,
              windows: tuple[tuple[slice, slice], tuple[slice, slice]], size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return image, labels and maps [C, H, W] (or None) cropped to the windows (source, target) on a size x size
    canvas: padding 0, labels 255."""
    source, target = windows
    image_out = np.zeros((size, size, 3), image.dtype)
    labels_out = np.full((size, size), VOID, np.uint8)
    image_out[target] = image[source]
    labels_out[target] = labels[source]
    maps_out = None
    if maps is not None:
        maps_out = np.zeros((len(maps), size, size), np.float32)
        maps_out[(slice(None), *target)] = maps[(slice(None), *source)]
    return image_out, labels_out, maps_out


def augment_with_labels(image: np.ndarray, labels: np.ndarray, resize_long: tuple[int, int], crop_size: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (image [S,S,3], labels [S,S]) after one random long-side rescale, flip and joint crop.

    Labels are resized with nearest neighbour; padding is 0 in the image and 255 in the labels.
    """
    image, labels, _ = augment_with_maps(image, labels, None, resize_long, crop_size, rng)
    return image, labels


def augment_with_maps(image: np.ndarray, labels: np.ndarray, maps: np.ndarray | None, resize_long: tuple[int, int],
                      crop_size: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return `augment_with_labels`'s (image, labels) and float maps [C, H, W] given the same transform
    (resized bilinearly, padding 0; None stays None); the random draws are the same with or without maps."""
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    image = resize_long_side(image, long_side)
    labels = resize_long_side(labels, long_side, resample=Image.NEAREST)
    if maps is not None:
        maps = np.stack([resize_long_side(np.asarray(channel, np.float32), long_side) for channel in maps])
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
        maps = None if maps is None else maps[:, :, ::-1]
    return crop_all(image, labels, maps, crop_windows(*labels.shape, crop_size, rng), crop_size)


class TrainAugment:
    """IRN's classifier augmentation: random long-side rescale, flip, normalise, random crop."""

    def __init__(self, resize_long: tuple[int, int], crop_size: int, mean: tuple, std: tuple):
        self.resize_long, self.crop_size, self.mean, self.std = resize_long, crop_size, mean, std

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """Return (float32 tensor [3, S, S], the same crop as uint8 RGB [S, S, 3]); padding is 0 in both."""
        image = resize_long_side(image, int(rng.integers(self.resize_long[0], self.resize_long[1] + 1)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        windows = crop_windows(*image.shape[:2], self.crop_size, rng)
        rgb = np.zeros((self.crop_size, self.crop_size, 3), np.uint8)
        rgb[windows[1]] = image[windows[0]]
        return _paste(normalize(image, self.mean, self.std), self.crop_size, windows), rgb
