"""What CAM export reads from a method's network: `CamHooks`, built by `Method.cam_hooks` and taken by
`cams/infer.py` (kept apart from the inference code so that the method interface does not import it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

CamMaps = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # images [B,3,h,w] -> {name: [B, K, h', w'] >= 0}
ClassScores = Callable[[torch.Tensor], torch.Tensor]  # images [B,3,h,w] -> image-level logits [B, K]
SegmentLogits = Callable[[torch.Tensor], torch.Tensor]  # images [B,3,h,w] -> logits [B, K+1, h', w']


class RawMaps(Protocol):
    """images [N,3,H,W] -> {name: RawMap(values [N, ...], layout, grid)} (see cams.store.RawMap)."""

    def __call__(self, images: torch.Tensor) -> dict: ...


@dataclass(frozen=True)
class CamHooks:
    """What the export reads from a method's network: `cam_maps` (required; 'cam' among its maps), the
    normalisation `mean` / `std` of its input (RGB in [0, 1]), and optionally `raw_maps` (stored as they are),
    `segment` (a segmentation branch, stored as 'seg') and `class_scores` (image-level logits, for the mAP)."""

    cam_maps: CamMaps
    mean: tuple
    std: tuple
    raw_maps: RawMaps | None = None
    segment: SegmentLogits | None = None
    class_scores: ClassScores | None = None
