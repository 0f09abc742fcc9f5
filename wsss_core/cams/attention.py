"""Attention refinement of transformer CAMs: MCTformer-V2's fusion, semantic modulation and TransCAM's product.

Inputs are one view's head-averaged attention, already fused over the chosen layers: class-to-patch
`c2p` [B, C, N] (row c: class token c's attention to the N patches) and patch-to-patch `p2p`
[B, N, N] (row i: query patch i); patches in row-major order (i = y * w + x). Spec:
../shared/methods/semantic_modulation.md, sections 2.5 and 2.6; the section-7 ambiguities are
keyword arguments at its recommended defaults. `attention_refine` is TransCAM's (spec
../shared/methods/conformer.md, section 2.7).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

EPSILON = 1e-9  # ratio * N is rounded as the exact product would be (0.7 * 90 is 62.99999... in floating point)
ROUNDINGS = {"floor": lambda x: math.floor(x + EPSILON), "round": lambda x: math.floor(x + 0.5 + EPSILON),
             "ceil": lambda x: math.ceil(x - EPSILON)}  # round: halves up (0.3 * 15 = 4.5 -> 5)
ORIENTATIONS = ("gather", "literal")


def neighbour_count(tokens: int, ratio: float, rounding: str = "floor", exclude_self: bool = False) -> int:
    """Return S, the size of each patch's semantic-neighbour set: max(1, rounding(ratio * N)), at most N
    (N - 1 without the patch itself, for N >= 2). floor: N = 12 -> 3, 196 -> 58, 713 -> 213."""
    count = max(1, int(ROUNDINGS[rounding](ratio * tokens)))
    return max(1, min(count, tokens - 1)) if exclude_self else min(count, tokens)


def semantic_neighbours(p2p: torch.Tensor, count: int, exclude_self: bool = False) -> torch.Tensor:
    """Return the selection U [B, N, N] (0/1, dtype of p2p): U[i, j] = 1 for the `count` patches j with the
    largest p2p[i, j], patch i itself left out with exclude_self. Patches tied at the count-th largest value
    are taken in index order (lowest first), as a stable sort would: float16 stores do tie."""
    scores = p2p
    if exclude_self:
        diagonal = torch.eye(p2p.shape[-1], dtype=torch.bool, device=p2p.device)
        scores = p2p.masked_fill(diagonal, float("-inf"))
    threshold = _kth_largest(scores, count)  # [B, N, 1]
    above, tied = scores > threshold, scores == threshold
    missing = count - above.sum(-1, keepdim=True)  # how many of the tied patches complete the set
    if not torch.equal(tied.sum(-1, keepdim=True), missing):  # more ties than places: lowest indices first
        tied &= tied.cumsum(-1) <= missing
    return (above | tied).to(p2p.dtype)


def _kth_largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Return the count-th largest value of each row [..., 1] (NumPy's introselect on CPU: 2.5x torch's topk)."""
    if scores.device.type == "cpu" and not scores.requires_grad:
        position = scores.shape[-1] - count
        return torch.from_numpy(np.partition(scores.numpy(), position, axis=-1)[..., position:position + 1])
    return scores.topk(count, dim=-1, sorted=False).values.amin(-1, keepdim=True)


def semantic_modulation(c2p: torch.Tensor, p2p: torch.Tensor, *, ratio: float = 0.3, alpha: float = 1.2,
                        exclude_self: bool = False, rounding: str = "floor") -> torch.Tensor:
    """Return the modulated class-to-patch attention [B, C, N] (spec eqs. 3-4).

    Each patch i adds alpha times the mean class-to-patch attention over its semantic neighbours U_i
    (the top `ratio` of row i of p2p): c2p + alpha * c2p @ U^T / S, a simultaneous update from the
    unmodified c2p. One top-k and one batched matrix product; no loop over patches.
    """
    count = neighbour_count(p2p.shape[-1], ratio, rounding, exclude_self)
    selection = semantic_neighbours(p2p, count, exclude_self)
    return c2p + alpha / count * c2p @ selection.transpose(1, 2)


def semantic_modulation_reference(c2p: torch.Tensor, p2p: torch.Tensor, *, ratio: float = 0.3, alpha: float = 1.2,
                                  exclude_self: bool = False, rounding: str = "floor", reverse: bool = False
                                  ) -> torch.Tensor:
    """Return what `semantic_modulation` returns, computed as the spec's loop (section 8, test 10): for each
    view, class c and patch i (in reverse order with reverse), sort row i of p2p (stable: ties lowest index
    first), average c2p(c, .) over its top S, add alpha times that to the unmodified c2p(c, i). The
    straightforward reference that tests and bench/semod_refine.py check the vectorised one against."""
    views, classes, tokens = c2p.shape
    count = neighbour_count(tokens, ratio, rounding, exclude_self)
    source, affinity = c2p.numpy(), p2p.numpy()
    out = source.copy()
    for view in range(views):
        for c in range(classes):
            for i in reversed(range(tokens)) if reverse else range(tokens):
                order = np.argsort(-affinity[view, i], kind="stable")
                if exclude_self:
                    order = order[order != i]
                out[view, c, i] = source[view, c, i] + alpha * source[view, c, order[:count]].mean()
    return torch.from_numpy(out)


def joint_refine(cam_logits: torch.Tensor, c2p: torch.Tensor, p2p: torch.Tensor, *, use_cam: bool = True,
                 use_c2p: bool = True, use_p2p: bool = True, orientation: str = "gather", relu: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (modulated CAM, final CAM), each [B, C, h, w] (spec eqs. 5-6), from cam_logits [B, C, h, w].

    modulated = phi(cam_logits) * c2p, phi = ReLU with relu (MCTformer); use_cam False drops the CAM
    factor (MCTformer-V1: the attention alone), use_c2p False the attention factor. final = the
    patch-to-patch product of the modulated CAM: gather (MCTformer-V2) final[c, i] = sum_j p2p[i, j]
    mod[c, j]; literal (the paper's Mod x A_p2p) final[c, j] = sum_i mod[c, i] p2p[i, j]; use_p2p False:
    final = modulated.
    """
    if not (use_cam or use_c2p):
        raise ValueError("joint_refine needs the CAM or the class-to-patch attention (use_cam or use_c2p)")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {ORIENTATIONS}")
    batch, classes, height, width = cam_logits.shape
    modulated = torch.ones_like(c2p)  # [B, C, N]
    if use_cam:
        modulated = (F.relu(cam_logits) if relu else cam_logits).flatten(2)
    if use_c2p:
        modulated = modulated * c2p
    final = modulated
    if use_p2p:
        final = modulated @ (p2p.transpose(1, 2) if orientation == "gather" else p2p)
    return modulated.view(batch, classes, height, width), final.view(batch, classes, height, width)


TRANSCAM_MODES = ("transcam", "attnagg", "clsattn", "convcam")


def attention_refine(cam_logits: torch.Tensor, attention: torch.Tensor, mode: str = "transcam") -> torch.Tensor:
    """Return TransCAM's refined CAM logits [B, C, h, w] from CAM logits [B, C, h, w] on the token grid and
    attention [B, 1 + N, 1 + N] (token 0 the cls token, N = h * w patches row-major; head-averaged, summed or
    averaged over blocks). The modes are TransCAM's (network/conformer.py): transcam, refined[c, p] =
    sum_q A[p, q] cam[c, q] over the patch-to-patch block; attnagg, the transposed product sum_q A[q, p] cam[c, q];
    clsattn, cam[c, p] * A[0, p] (the cls token's attention); convcam, the CAM as it is. No ReLU: TransCAM
    clamps only after merging the views."""
    if mode not in TRANSCAM_MODES:
        raise ValueError(f"mode {mode!r} is not one of {TRANSCAM_MODES}")
    batch, classes, height, width = cam_logits.shape
    if attention.shape[-2:] != (1 + height * width, 1 + height * width):
        raise ValueError(f"attention {tuple(attention.shape)} does not fit a {height} x {width} token grid plus cls")
    cam = cam_logits.flatten(2)  # [B, C, N]
    patches = attention[:, 1:, 1:]  # [B, N, N]
    if mode == "transcam":
        cam = cam @ patches.transpose(1, 2)
    elif mode == "attnagg":
        cam = cam @ patches
    elif mode == "clsattn":
        cam = cam * attention[:, :1, 1:]
    return cam.view(batch, classes, height, width)


def object_tokens(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Return bool [h * w] (row-major): a token is an object token when more than half of the labelled pixels of
    its cell are foreground. mask: uint8 [H, W] (0 background, 1..K classes, 255 void, which does not count); the
    cells are the image's area resampled to the token grid (h, w)."""
    labels = torch.from_numpy(mask.astype(np.int64))
    valid = (labels != 255).float()[None, None]
    foreground = ((labels > 0) & (labels != 255)).float()[None, None]
    labelled = F.interpolate(valid, grid, mode="area")[0, 0]
    share = F.interpolate(foreground, grid, mode="area")[0, 0] / labelled.clamp(min=1e-6)
    return ((share > 0.5) & (labelled > 0)).flatten().numpy()


def attention_on_objects(p2p: np.ndarray, objects: np.ndarray) -> tuple[float, float] | None:
    """Return (mean share of an object query's attention on object keys, the same for background queries) of
    patch-to-patch attention p2p [N, N] (row i: query i; rows renormalised to sum 1), objects bool [N]; None when
    the image has no object token or no background token. An affinity gives the first more than the second;
    an evidence hub (every query reading the object tokens) gives the second as much or more."""
    if objects.all() or not objects.any():
        return None
    rows = p2p / np.maximum(p2p.sum(1, keepdims=True), 1e-12)
    on_objects = rows[:, objects].sum(1)  # [N]
    return float(on_objects[objects].mean()), float(on_objects[~objects].mean())


def object_attention_mass(samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Return, over samples of (patch-to-patch attention [N, N], object tokens bool [N]) of images: the mean
    share of object queries' and of background queries' attention on object tokens (`attention_on_objects`),
    the object tokens' mean share of the grid, and the number of images counted (those with both kinds of
    token); None for each mean without such an image."""
    shares, grid_shares = [], []
    for p2p, objects in samples:
        share = attention_on_objects(p2p, objects)
        if share is not None:
            shares.append(share)
            grid_shares.append(float(objects.mean()))
    mean = (lambda values: float(np.mean(values)) if values else None)
    return {"object_query_on_objects": mean([share[0] for share in shares]),
            "background_query_on_objects": mean([share[1] for share in shares]),
            "object_token_share": mean(grid_shares), "images": len(shares)}


def class_map_correlation(maps: np.ndarray) -> float | None:
    """Return the mean Pearson correlation over pairs of rows of maps [k, N] (e.g. the present classes'
    class-to-patch attention), or None for fewer than 2 rows. Class-specific maps correlate little; one map
    copied to every class gives 1."""
    if len(maps) < 2:
        return None
    centred = maps - maps.mean(1, keepdims=True)
    unit = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    correlations = unit @ unit.T
    pairs = np.triu_indices(len(maps), 1)
    return float(correlations[pairs].mean())
