"""Multi-scale, flip-augmented CAM inference (IRN's protocol) and export to a CAM store.

Everything here takes the network's hooks as one `CamHooks` object that the method builds
(`Method.cam_hooks`), and the `cams` section, so it serves every method without knowing any.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss_core.cams.hooks import CamHooks, CamMaps, RawMaps, SegmentLogits
from wsss_core.cams.store import CamStoreWriter, RawArray
from wsss_core.config import CamsParams
from wsss_core.data.dataset import Dataset, size_batches
from wsss_core.data.transforms import normalize
from wsss_core.distributed import shard_of
from wsss_core.training import memory_format

@torch.no_grad()
def multiscale_maps(cam_maps: CamMaps, images: torch.Tensor, scales: list[float], flip: bool) -> dict[str, torch.Tensor]:
    """Return each map of `cam_maps` summed over scales (and flips), as float32 [B, K, H, W].

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
        for name, maps in cam_maps(scaled).items():
            maps = F.interpolate(maps.float(), (height, width), mode="bilinear", align_corners=False)
            if flip:
                maps = maps[:batch] + maps[batch:].flip(-1)
            totals[name] = totals[name] + maps if name in totals else maps
    return totals


def with_views(images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Return [V*B, 3, H, W]: the images, then (flip) their mirror images; V = 2 with flip, else 1."""
    return torch.cat([images, images.flip(-1)]) if flip else images


@torch.no_grad()
def raw_views(raw_maps: RawMaps, images: torch.Tensor, flip: bool) -> list[dict[str, RawArray]]:
    """Return per image {name: (float32 [V, ...], 'views,' + layout, grid)} of raw_maps at scale 1.

    View 0 is the image, view 1 (with flip) its mirror image, each map as the method computed it
    (a flipped view's token maps are not flipped back: their layout may not be spatial).
    """
    batch = images.shape[0]
    per_image: list[dict[str, RawArray]] = [{} for _ in range(batch)]
    for name, raw in raw_maps(with_views(images, flip)).items():
        values = raw.values.float().unflatten(0, (-1, batch)).transpose(0, 1).cpu().numpy()  # [B, V, ...]
        for index in range(batch):
            per_image[index][name] = (values[index], "views," + raw.layout, tuple(raw.grid))
    return per_image


@torch.no_grad()
def segmentation_probabilities(segment: SegmentLogits, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Return softmax probabilities [B, K+1, H, W] of a segmentation branch at scale 1 (flip-averaged)."""
    batch, _, height, width = images.shape
    logits = F.interpolate(segment(with_views(images, flip)).float(), (height, width), mode="bilinear",
                           align_corners=False)
    probabilities = logits.softmax(1)
    return (probabilities[:batch] + probabilities[batch:].flip(-1)) / 2 if flip else probabilities


def normalize_present(maps: torch.Tensor, keys: np.ndarray) -> np.ndarray:
    """Return the maps of the present classes, each divided by its max (+1e-5): float32 [k, H, W].

    maps: [K, H, W] non-negative; keys: class indices 1..K present in the image.
    """
    selected = maps[torch.as_tensor(keys, dtype=torch.long) - 1]  # [k, H, W]
    peak = selected.flatten(1).amax(1).view(-1, 1, 1)
    return (selected / (peak + 1e-5)).cpu().numpy()


class _BatchReader(torch.utils.data.Dataset):
    """Loads one size-batch of normalised images [B, 3, H, W] (lets DataLoader workers prefetch)."""

    def __init__(self, dataset: Dataset, batches: list[list[str]], mean: tuple, std: tuple):
        self.dataset, self.batches, self.mean, self.std = dataset, batches, mean, std

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.stack([normalize(self.dataset.read_image(i), self.mean, self.std) for i in self.batches[index]])


def iterate_cams(hooks: CamHooks, dataset: Dataset, ids: list[str], cams: CamsParams, *, device: torch.device,
                 shard: tuple[int, int] = (0, 1)
                 ) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, RawArray],
                                     np.ndarray | None]]:
    """Yield (id, cam float32 [k, H, W] in [0, 1], keys [k], extras, raw, scores) per image, in size-batch order.

    shard (index, count): only every count-th size batch from `index`. Shards are whole batches of the
    one-process run, so each image is computed in the very batch it would be without shards.

    The maps are summed over `cams.scales` (and flips, `cams.flip`) in size batches of `cams.batch_size`.
    Only the image's ground-truth classes are kept (the standard protocol). extras: the other class
    maps of hooks.cam_maps ([k, H, W], normalised like the CAM) and, with hooks.segment, 'seg': its
    probabilities for [background, keys] ([k+1, H, W]); raw: hooks.raw_maps at scale 1 with the flip view
    stacked. On CUDA: float16 autocast and channels_last images (place the model with training.place). scores:
    hooks.class_scores of the image at scale 1 without flip (float32 [K]; the classifier's mAP on the split
    comes from them), or None.
    """
    scales, flip = cams.scales, cams.flip
    batches = shard_of(size_batches(dataset, ids, cams.batch_size), *shard)
    loader = torch.utils.data.DataLoader(_BatchReader(dataset, batches, hooks.mean, hooks.std), batch_size=None,
                                         num_workers=cams.num_workers)
    bar = tqdm(total=sum(map(len, batches)), desc="export_cams", unit="img")
    for batch_ids, images in zip(batches, loader):
        images = images.to(device, memory_format=memory_format(device))
        with torch.autocast(device.type, enabled=device.type == "cuda"):  # float16: closer to fp32 CAMs than bf16
            maps = multiscale_maps(hooks.cam_maps, images, scales, flip)
            raws = raw_views(hooks.raw_maps, images, flip) if hooks.raw_maps else [{} for _ in batch_ids]
            segmentation = segmentation_probabilities(hooks.segment, images, flip) if hooks.segment else None
            with torch.no_grad():
                scores = hooks.class_scores(images).float().cpu().numpy() if hooks.class_scores else None
        for index, image_id in enumerate(batch_ids):
            keys = np.asarray(dataset.labels[image_id], dtype=np.int64)
            extras = {name: normalize_present(value[index], keys) for name, value in maps.items()}
            if segmentation is not None:
                channels = torch.as_tensor(np.concatenate([[0], keys]), dtype=torch.long, device=device)
                extras["seg"] = segmentation[index, channels].cpu().numpy()
            yield image_id, extras.pop("cam"), keys, extras, raws[index], None if scores is None else scores[index]
        bar.update(len(batch_ids))
    bar.close()


def export_cams(hooks: CamHooks, dataset: Dataset, ids: list[str], out_path: str | Path, attrs: dict,
                cams: CamsParams, *, device: torch.device, shard: tuple[int, int] = (0, 1)) -> float:
    """Write the CAM store at out_path (atomically), of one shard of ids (see iterate_cams), and return the
    export rate in images/second."""
    start, count = time.perf_counter(), 0
    with CamStoreWriter(out_path, attrs) as writer:
        for image_id, cam, keys, extras, raw, scores in iterate_cams(hooks, dataset, ids, cams, device=device,
                                                                     shard=shard):
            writer.write(image_id, cam, keys, extras, raw, scores)
            count += 1
    return count / (time.perf_counter() - start)
