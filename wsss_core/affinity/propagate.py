"""Applying the random walk to CAM stores: background channel, stride-8 pooling, upsampling."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss_core.affinity.pairs import neighbour_offsets
from wsss_core.affinity.random_walk import random_walk
from wsss_core.cams.store import CamStore
from wsss_core.config import RwParams
from wsss_core.data.dataset import Dataset, size_batches
from wsss_core.data.transforms import normalize
from wsss_core.distributed import shard_of
from wsss_core.models.affinity_net import AffinityNet, pair_affinities


def with_background(cam: np.ndarray, rw: RwParams) -> np.ndarray:
    """Return float32 [k+1, H, W]: the background score that walks with the CAMs [k, H, W], stacked before them.

    rw.bg_mode 'alpha': (1 - max_c cam)^bg_alpha (PSA); 'constant': the constant rw.bg_constant (MCTformer).
    """
    peak = cam.max(0) if cam.shape[0] else np.zeros(cam.shape[1:], np.float32)
    background = (1 - peak) ** rw.bg_alpha if rw.bg_mode == "alpha" else np.full_like(peak, rw.bg_constant)
    return np.concatenate([background[None], cam]).astype(np.float32)


def walked_scores(walked: np.ndarray, rw: RwParams) -> np.ndarray:
    """Return float32 [k+1, H, W] background-first scores in [0, 1] from one image's walked maps.

    walked: [k+1, H, W] (background walked with the CAMs) divided by its maximum; or, with
    rw.bg_mode 'after_walk' (IRN), [k, H, W] CAMs divided by their maximum, with the constant
    rw.bg_constant stacked before them.
    """
    walked = walked / max(float(walked.max(initial=0.0)), 1e-8)
    if rw.bg_mode != "after_walk":
        return walked.astype(np.float32)
    background = np.full((1, *walked.shape[1:]), rw.bg_constant, np.float32)
    return np.concatenate([background, walked]).astype(np.float32)


@torch.no_grad()
def image_affinities(model: AffinityNet, images: torch.Tensor, radius: int) -> torch.Tensor:
    """Return pair affinities [B, O, ceil(H/8), ceil(W/8)] for normalised images [B, 3, H, W].

    Images are zero-padded on the bottom/right to a multiple of 8 first.
    """
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, (-width) % 8, 0, (-height) % 8))
    with torch.autocast(images.device.type, enabled=images.device.type == "cuda"):
        features = model(padded)
    return pair_affinities(features.float(), neighbour_offsets(radius))


def propagate_batch(model: AffinityNet, images: torch.Tensor, scores: torch.Tensor, rw: RwParams) -> torch.Tensor:
    """Random-walk scores [B, C, H, W] with the affinities of images [B, 3, H, W]; returns [B, C, H, W].

    As PSA: scores are zero-padded to a multiple of 8, average-pooled by 8, propagated, then
    upsampled bilinearly by 8 and cropped back to H x W.
    """
    height, width = images.shape[-2:]
    affinity = image_affinities(model, images, rw.radius)  # [B, O, h, w]
    padded = F.pad(scores, (0, (-width) % 8, 0, (-height) % 8))
    pooled = F.avg_pool2d(padded, 8, 8)  # [B, C, h, w]
    walked = random_walk(pooled, affinity, neighbour_offsets(rw.radius), rw.beta, rw.logt,
                         interior_only=rw.pair_set == "psa")
    return F.interpolate(walked, scale_factor=8, mode="bilinear", align_corners=False)[..., :height, :width]


def iterate_random_walk(model: AffinityNet, store: CamStore, dataset: Dataset, ids: list[str], rw: RwParams, *,
                        device: torch.device, shard: tuple[int, int] = (0, 1)
                        ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (id, scores float32 [k+1, H, W] in [0, 1], keys [k]); channel 0 is background (see walked_scores).

    Images of equal size and equal class count are batched together (rw.batch_size at most). shard (index,
    count): only every count-th size batch from `index`, so each image walks in the batch it would without shards.
    """
    model.eval().to(device)
    batches = shard_of(size_batches(dataset, ids, rw.batch_size), *shard)
    bar = tqdm(total=sum(len(batch) for batch in batches), desc="random_walk", unit="img")
    for batch in batches:
        by_count: dict[int, list[str]] = {}
        for image_id in batch:
            by_count.setdefault(len(dataset.labels[image_id]), []).append(image_id)
        for same in by_count.values():
            cams = [store.read(image_id) for image_id in same]
            walking = [cam if rw.bg_mode == "after_walk" else with_background(cam, rw) for cam, _ in cams]
            if walking[0].shape[0] == 0:  # no class to walk (IRN's background comes after the walk)
                walked = np.stack(walking)
            else:
                images = torch.stack([normalize(dataset.read_image(i), model.mean, model.std) for i in same])
                walked = propagate_batch(model, images.to(device), torch.from_numpy(np.stack(walking)).to(device),
                                         rw).cpu().numpy()
            for image_id, (_, keys), result in zip(same, cams, walked):
                yield image_id, walked_scores(result, rw), keys
            bar.update(len(same))
    bar.close()
