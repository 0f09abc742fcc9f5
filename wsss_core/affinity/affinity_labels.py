"""Affinity labels from CAMs: PSA's (Ahn & Kwak, CVPR 2018) and IRN's (Ahn et al., CVPR 2019).

A label map holds 0 (confident background), a class index 1..K (confident foreground) or 255
(unsure). It is reduced to the feature stride and turned into pair labels over PSA's
half-neighbourhood (see `pairs.py`): positive background pairs, positive foreground pairs of
one class, and negative pairs of two different labels.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from wsss_core.affinity.pairs import neighbour_offsets, shifted, valid_pair_mask
from wsss_core.data.palette import VOID

MarginalsCRF = Callable[[np.ndarray, np.ndarray], np.ndarray]
LabelCRF = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _class_ids(keys) -> np.ndarray:
    """Return uint8 [k + 1]: 0, then the image's class indices, indexed by channel of [bg, cams]."""
    return np.concatenate([[0], np.asarray(keys, dtype=np.int64).reshape(-1)]).astype(np.uint8)


def _psa_labels(image: np.ndarray, cam: np.ndarray, alpha: float, crf: MarginalsCRF | None) -> np.ndarray:
    """Return int64 [H, W]: argmax channel of the (CRF of the) distribution ∝ [(1 - max cam) ** alpha, cam]."""
    background = (1.0 - cam.max(axis=0, initial=0.0, keepdims=True)) ** alpha
    scores = np.concatenate([background, cam])
    probabilities = scores / scores.sum(axis=0, keepdims=True)
    if crf is not None:
        probabilities = crf(image, probabilities)
    return probabilities.argmax(axis=0)


def psa_affinity_label_map(image: np.ndarray, cam: np.ndarray, keys, alpha_low: float = 4.0,
                           alpha_high: float = 32.0, crf: MarginalsCRF | None = None) -> np.ndarray:
    """Return PSA's affinity label map, uint8 [H, W] in {0, keys..., 255}.

    image: uint8 [H, W, 3]; cam: float [k, H, W] in [0, 1] for the image's classes `keys` [k] (1..K).
    As PSA's infer_cls.py and VOC12AffDataset: the background score (1 - max_c cam) ** alpha is
    stacked before the CAMs and normalised to a distribution per pixel (PSA hands its CRF the raw
    scores); `crf(image, probabilities [k+1, H, W] float32) -> marginals [k+1, H, W]` refines it
    (None: no CRF). la = argmax with alpha_low (large background: a foreground label there is
    confident), ha = argmax with alpha_high (small background: a background label there is
    confident). Label: la where la > 0, else 255; then 0 where ha == 0 (PSA's order: ha wins
    when both are confident). Ties in the argmax go to the background.
    """
    cam = np.asarray(cam, dtype=np.float32)
    low = _psa_labels(image, cam, alpha_low, crf)
    high = _psa_labels(image, cam, alpha_high, crf)
    labels = np.where(low > 0, _class_ids(keys)[low], np.uint8(VOID))
    labels[high == 0] = 0
    return labels


def _irn_labels(image: np.ndarray, cam: np.ndarray, background_score: float, crf_labels: LabelCRF | None
                ) -> np.ndarray:
    """Return int64 [H, W]: argmax channel of [background_score, cam], CRF-smoothed when crf_labels is given."""
    scores = np.concatenate([np.full((1, *cam.shape[1:]), background_score, dtype=cam.dtype), cam])
    labels = scores.argmax(axis=0)
    if crf_labels is not None:
        labels = np.asarray(crf_labels(image, labels.astype(np.uint8), len(scores)), dtype=np.int64)
    return labels


def irn_affinity_label_map(image: np.ndarray, cam: np.ndarray, keys, fg_threshold: float = 0.30,
                           bg_threshold: float = 0.05, crf_labels: LabelCRF | None = None) -> np.ndarray:
    """Return IRN's affinity ('ir') label map, uint8 [H, W] in {0, keys..., 255}.

    image: uint8 [H, W, 3]; cam: float [k, H, W] in [0, 1] for the image's classes `keys` [k] (1..K).
    As IRN's cam_to_ir_label.py: fg_conf = argmax of the CAMs padded with a constant background
    score fg_threshold, bg_conf = the same with bg_threshold (ties go to the background, so a CAM
    must exceed the threshold). Label: fg_conf's class, 255 where fg_conf is background, 0 where
    both are background (IRN's `bg_conf + fg_conf == 0`; without a CRF, bg_conf == 0 implies
    fg_conf == 0). `crf_labels(image, labels uint8 [H, W] in 0..n_labels-1, n_labels) -> uint8
    [H, W]` smooths each argmax map as IRN's `crf_inference_label` does (unary from the labels,
    gt_prob 0.7); its labels are channel positions (0 = background, i = keys[i - 1]), not class
    indices. None: no CRF.
    """
    cam = np.asarray(cam, dtype=np.float32)
    class_ids = _class_ids(keys)
    fg_conf = class_ids[_irn_labels(image, cam, fg_threshold, crf_labels)]
    bg_conf = class_ids[_irn_labels(image, cam, bg_threshold, crf_labels)]
    labels = np.where(fg_conf > 0, fg_conf, np.uint8(VOID))
    labels[(fg_conf == 0) & (bg_conf == 0)] = 0
    return labels


def downsample_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Return uint8 [ceil(H/stride), ceil(W/stride)]: labels [H, W] sampled at each stride x stride cell's centre.

    Cell (i, j) takes pixel (stride*i + stride//2, stride*j + stride//2), clipped to the last
    row/column for a partial cell at the border. This is IRN's PIL nearest rescale of its label
    crop (stride 4: pixel 4i + 2). PSA instead average-pools the la/ha CRF scores over 8 x 8
    blocks (skimage block_reduce, zero padding to ceil) before the argmax; on a label map the
    cell centre is the nearest-neighbour stand-in for that.
    """
    height, width = labels.shape
    rows = np.minimum(np.arange(0, height, stride) + stride // 2, height - 1)
    cols = np.minimum(np.arange(0, width, stride) + stride // 2, width - 1)
    return np.asarray(labels, dtype=np.uint8)[np.ix_(rows, cols)]


def affinity_pair_labels(labels: np.ndarray, radius: int) -> dict[str, np.ndarray]:
    """Return PSA's pair labels over labels uint8 [h, w]: bool [O, h, w] masks, O = len(neighbour_offsets(radius)).

    Entry (o, y, x) is the pair (y, x)-(y + dy_o, x + dx_o). 'bg_pos': both ends 0; 'fg_pos': both
    the same class 1..K; 'neg': both valid (not 255) and different. A pair with a 255 end or a
    neighbour outside the map is in none. As PSA's ExtractAffinityLabelInRadius, except that PSA
    crops the map to the pixels whose every neighbour is inside, whereas these masks keep the
    full map and leave the outside pairs out.
    """
    offsets = neighbour_offsets(radius)
    height, width = labels.shape
    source = labels[None]
    target = np.stack([shifted(labels, dy, dx) for dy, dx in offsets])
    valid = valid_pair_mask(offsets, height, width) & (source != VOID) & (target != VOID)
    same = valid & (source == target)
    return {"bg_pos": same & (source == 0), "fg_pos": same & (source > 0), "neg": valid & (source != target)}
