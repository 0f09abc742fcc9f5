"""Multi-scale, flip-augmented CAM inference (IRN's protocol) and export to a CAM store."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wsss_core.cams.store import CamStoreWriter
from wsss_core.data.dataset import Dataset
from wsss_core.data.images import image_size
from wsss_core.data.transforms import normalize
from wsss_core.methods.base import Method


@torch.no_grad()
def multiscale_maps(method: Method, model: nn.Module, images: torch.Tensor, scales: list[float],
                    flip: bool) -> dict[str, torch.Tensor]:
    """Return each map of `method.cam_maps` summed over scales (and flips), as float32 [B, K, H, W].

    images: normalised [B, 3, H, W]. Each scale's maps are upsampled bilinearly to (H, W)
    before summing; the flipped copy's maps are flipped back.
    """
    batch, _, height, width = images.shape
    totals: dict[str, torch.Tensor] = {}
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(images, size, mode="bilinear", align_corners=False)
        if flip:
            scaled = torch.cat([scaled, scaled.flip(-1)])
        for name, maps in method.cam_maps(model, scaled).items():
            maps = F.interpolate(maps.float(), (height, width), mode="bilinear", align_corners=False)
            if flip:
                maps = maps[:batch] + maps[batch:].flip(-1)
            totals[name] = totals[name] + maps if name in totals else maps
    return totals


def normalize_present(maps: torch.Tensor, keys: np.ndarray) -> np.ndarray:
    """Return the maps of the present classes, each divided by its max (+1e-5): float32 [k, H, W].

    maps: [K, H, W] non-negative; keys: class indices 1..K present in the image.
    """
    selected = maps[torch.as_tensor(keys, dtype=torch.long) - 1]  # [k, H, W]
    peak = selected.flatten(1).amax(1).view(-1, 1, 1)
    return (selected / (peak + 1e-5)).cpu().numpy()


def size_batches(dataset: Dataset, ids: list[str], batch_size: int) -> list[list[str]]:
    """Group ids into batches of equal image size (at most batch_size each), keeping id order within a size."""
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[image_size(dataset.image_path(image_id), dataset.max_pixels)].append(image_id)
    return [group[start:start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)]


class _BatchReader(torch.utils.data.Dataset):
    """Loads one size-batch of normalised images [B, 3, H, W] (lets DataLoader workers prefetch)."""

    def __init__(self, dataset: Dataset, batches: list[list[str]], mean: tuple, std: tuple):
        self.dataset, self.batches, self.mean, self.std = dataset, batches, mean, std

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.stack([normalize(self.dataset.read_image(i), self.mean, self.std) for i in self.batches[index]])


def iterate_cams(method: Method, model: nn.Module, dataset: Dataset, ids: list[str], scales: list[float],
                 flip: bool, batch_size: int, device: torch.device, num_workers: int = 0
                 ) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Yield (id, cam float32 [k, H, W] in [0, 1], keys [k], other maps [k, H, W]) per image.

    Only the image's ground-truth classes are kept (the standard protocol). AMP on CUDA.
    """
    model.eval().to(device)
    batches = size_batches(dataset, ids, batch_size)
    loader = torch.utils.data.DataLoader(_BatchReader(dataset, batches, model.backbone.mean, model.backbone.std),
                                         batch_size=None, num_workers=num_workers)
    bar = tqdm(total=len(ids), desc="export_cams", unit="img")
    for batch_ids, images in zip(batches, loader):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            maps = multiscale_maps(method, model, images.to(device), scales, flip)
        for index, image_id in enumerate(batch_ids):
            keys = np.asarray(dataset.labels[image_id], dtype=np.int64)
            per_map = {name: normalize_present(value[index], keys) for name, value in maps.items()}
            yield image_id, per_map.pop("cam"), keys, per_map
        bar.update(len(batch_ids))
    bar.close()


def export_cams(method: Method, model: nn.Module, dataset: Dataset, ids: list[str], out_path, attrs: dict,
                scales: list[float], flip: bool, batch_size: int, device: torch.device,
                num_workers: int = 0) -> float:
    """Write the CAM store at out_path (atomically) and return the export rate in images/second."""
    start = time.perf_counter()
    with CamStoreWriter(out_path, attrs) as writer:
        for image_id, cam, keys, extra in iterate_cams(method, model, dataset, ids, scales, flip, batch_size,
                                                        device, num_workers):
            writer.write(image_id, cam, keys, extra)
    return len(ids) / (time.perf_counter() - start)
