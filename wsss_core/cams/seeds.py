"""Online seeds from class maps, as DSRG / AGEN draw them during training (spec agen.md, Eqs. 2-4).

`seed_probabilities` turns raw class maps into P = [M_bg, M_1..M_K] in [0, 1] (ReLU, resize, the image's
classes only, max-normalised, background (1 - max M)^alpha); `threshold_seeds` keeps a pixel as a seed of
channel j where exactly one channel passes the threshold rule, and ignores it (255) otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_core.data.palette import VOID

SEED_MODES = ("value", "topk_frac", "range_top")
CAM_NORMALISATIONS = ("relu_max", "min_max")
NORMALISER_EPSILON = 1e-5


@torch.no_grad()
def seed_probabilities(class_maps: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], *, alpha: float,
                       restrict_to_labels: bool = True, valid: torch.Tensor | None = None,
                       normalisation: str = "relu_max") -> torch.Tensor:
    """Return P [B, K+1, H, W] in [0, 1]: channel 0 the background (1 - max_k M_k)^alpha, channel k the
    class map Z_k bilinearly resized to size = (H, W) and normalised.

    normalisation 'relu_max' (the paper's): ReLU(Z_k) divided by its maximum (+1e-5), so a class whose map is
    negative everywhere is 0 everywhere; 'min_max' (a deviation): (Z_k - min) / (max - min + 1e-5) over the
    photo's pixels, so every class keeps a peak of 1 however negative its map.
    class_maps: raw Z [B, K, h, w]; labels: multi-hot [B, K]. restrict_to_labels zeroes the classes an
    image is not labelled with before the background (spec G3); valid (bool [B, H, W], False on padding)
    zeroes the maps outside the photo, so padding never sets the maximum (nor, with min_max, the minimum).
    """
    maps = F.relu(class_maps.float()) if normalisation == "relu_max" else class_maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size, mode="bilinear", align_corners=False)
    inside = torch.ones_like(maps[:, :1], dtype=torch.bool) if valid is None else valid[:, None]
    if normalisation == "min_max":
        low = maps.masked_fill(~inside, float("inf")).flatten(2).amin(2)[..., None, None]
        high = maps.masked_fill(~inside, float("-inf")).flatten(2).amax(2)[..., None, None]
        maps = (maps - low) / (high - low + NORMALISER_EPSILON)
    elif normalisation != "relu_max":
        raise ValueError(f"normalisation {normalisation!r} is not one of: {', '.join(CAM_NORMALISATIONS)}")
    maps = maps.clamp(min=0) * inside  # min_max: negative only outside the photo
    if restrict_to_labels:
        maps = maps * labels.to(maps.dtype)[:, :, None, None]
    if normalisation == "relu_max":
        maps = maps / (maps.flatten(2).amax(2)[..., None, None] + NORMALISER_EPSILON)
    background = (1 - maps.amax(1, keepdim=True)).clamp(min=0) ** alpha
    return torch.cat([background, maps], 1)


@torch.no_grad()
def threshold_seeds(probabilities: torch.Tensor, valid: torch.Tensor, threshold: float, mode: str = "value",
                    background_mode: str | None = None) -> torch.Tensor:
    """Return seeds int64 [B, H, W]: j where channel j alone passes the rule, 255 where none or several do
    and outside `valid` (bool [B, H, W], False on padding).

    mode 'value': P_j > threshold (the paper's reading); 'range_top': P_j >= 1 - threshold; 'topk_frac':
    P_j among the top `threshold` fraction of the image's valid pixels of channel j (and above 0).
    background_mode: the rule of channel 0 (the background) when it is not `mode` (None: `mode`, the spec's G2).
    """
    passing = _passing(probabilities, valid, threshold, mode)
    if background_mode not in (None, mode):
        passing[:, 0] = _passing(probabilities[:, :1], valid, threshold, background_mode)[:, 0]
    count = passing.sum(1)
    seeds = passing.to(torch.uint8).argmax(1)
    return torch.where((count == 1) & valid, seeds, torch.full_like(seeds, VOID)).long()


def _passing(probabilities: torch.Tensor, valid: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """Return bool [B, C, H, W]: where each channel passes the seed rule `mode` (threshold_seeds)."""
    if mode == "value":
        passing = probabilities > threshold
    elif mode == "range_top":
        passing = probabilities >= 1 - threshold
    elif mode == "topk_frac":
        batch, channels = probabilities.shape[:2]
        inside = probabilities.masked_fill(~valid[:, None], float("nan")).flatten(2)  # [B, C, H*W]
        cut = torch.nanquantile(inside, 1 - threshold, dim=2)  # [B, C]
        passing = (probabilities >= cut[..., None, None]) & (probabilities > 0)
    else:
        raise ValueError(f"seed mode {mode!r} is not one of: {', '.join(SEED_MODES)}")
    return passing


def images_missing_a_class(seeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return bool [B]: the images in which some labelled class has no seed pixel.

    seeds: int64 [B, H, W] (0 background, 1..K classes, 255 ignore); labels: multi-hot [B, K].
    """
    classes = labels.shape[1]
    slots = torch.where(seeds == VOID, torch.full_like(seeds, classes + 1), seeds).flatten(1)  # [B, H*W] in 0..K+1
    seeded = torch.zeros(len(seeds), classes + 2, dtype=torch.bool, device=seeds.device)
    seeded.scatter_(1, slots, True)
    return (labels.bool() & ~seeded[:, 1:classes + 1]).any(1)
