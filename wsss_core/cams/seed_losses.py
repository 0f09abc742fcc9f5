"""Weak-supervision losses on a segmentation output: DSRG's balanced seeding loss and SEC's
constrain-to-boundary loss (a dense CRF of the prediction as its target), as AGEN trains branch B."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.config import CrfParams
from wsss_core.crf import dense_crf
from wsss_core.data.palette import VOID

CrfMap = Callable[[Callable, Sequence], list]  # (function, jobs) -> [function(job) for job in jobs], maybe pooled


def balanced_seed_loss(logits: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Return DSRG's balanced seeding loss, the batch mean of, per image,
    -mean over foreground seeds of log S_y - mean over background seeds of log S_0.

    logits [B, K+1, H, W]; seeds int64 [B, H, W] in 0..K or 255 (ignored). A group without seeds adds 0.
    """
    log_probabilities = F.log_softmax(logits.float(), 1)
    seeded = seeds != VOID
    picked = log_probabilities.gather(1, torch.where(seeded, seeds, 0)[:, None])[:, 0]  # [B, H, W]
    foreground, background = seeded & (seeds > 0), seeds == 0
    per_image = -((picked * foreground).flatten(1).sum(1) / foreground.flatten(1).sum(1).clamp(min=1)
                  + (picked * background).flatten(1).sum(1) / background.flatten(1).sum(1).clamp(min=1))
    return per_image.mean()


def clipped_distribution(probabilities: np.ndarray | torch.Tensor, floor: float):
    """Return probabilities [C, ...] (or [B, C, ...] for a tensor) clipped to >= floor and renormalised over C."""
    if isinstance(probabilities, torch.Tensor):
        clipped = probabilities.clamp(min=floor)
        return clipped / clipped.sum(1, keepdim=True)
    clipped = np.maximum(probabilities, floor)
    return clipped / clipped.sum(0, keepdims=True)


def crf_target(job: tuple[np.ndarray, np.ndarray, CrfParams, float]) -> np.ndarray:
    """Return the CRF marginals R [C, h, w] (clipped, renormalised) of job = (image uint8 [h, w, 3],
    probabilities float32 [C, h, w], CRF settings, probability floor): a process-pool job."""
    image, probabilities, settings, floor = job
    return clipped_distribution(dense_crf(image, clipped_distribution(probabilities, floor), settings), floor)


def boundary_loss(logits: torch.Tensor, rgb: torch.Tensor, settings: CrfParams, floor: float,
                  crf_map: CrfMap) -> torch.Tensor:
    """Return SEC's constrain-to-boundary loss: the mean over pixels and images of KL(R || S), where S is
    the softmax of logits [B, K+1, h, w] and R its dense CRF on the photo rgb uint8 [B, H, W, 3] resized
    (bilinear) to h x w. R is a constant target (no gradient); both are clipped at `floor` and renormalised.

    crf_map runs the CRFs (one job per image, e.g. over a process pool).
    """
    probabilities = clipped_distribution(torch.softmax(logits.float(), 1), floor)  # [B, C, h, w]
    small = F.interpolate(rgb.permute(0, 3, 1, 2).float(), logits.shape[-2:], mode="bilinear",
                          align_corners=False).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    jobs = [(image, scores, settings, floor) for image, scores in
            zip(small.cpu().numpy(), probabilities.detach().cpu().numpy())]
    targets = torch.from_numpy(np.stack(crf_map(crf_target, jobs))).to(logits.device)
    return (targets * (targets.log() - probabilities.log())).sum(1).mean()
