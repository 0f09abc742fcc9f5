"""RWS (Rao et al., "Refined Weak Slice"): the tensor core of the segmentation-stage refinement.

Spec: shared/methods/rws.md. Defaults are the spec's [REC] choices; each is a keyword argument.

* Seg-Grad-CAM per backbone stage (eq. 1, G1, G2): `StageRecorder`, `seg_grad_cam_raw`, `seg_grad_cam`,
  and `class_attention_maps` (eq. 2, spec 3.1 item 5) for a segmenter with `stage_modules()`.
* Windows and their scores (3.2, G4, G5): `sliding_windows`, `slice_iou`, `window_scores`.
* The threshold T (3.2 item 3, G6): `attention_threshold`, `curve_iou`.
* Weak slices (3.2 item 4, 3.3 item 1, G3): `select_weak_slices`, `local_slices`.
* Selection, lambda and the owner rule (eqs. 3-7, 3.4, 3.5, G10): `blend_weights`; blend strengths on a
  stage's grid (3.4 item 4): `pool_to_grid`.

Boxes are (y0, x0, y1, x1) in pixels, ends exclusive. Layers are numbered 1..l where the spec does
(`layers`), and indexed 0..l-1 in tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.metrics import IGNORE_INDEX

Box = tuple[int, int, int, int]
PIXEL_SETS = ("argmax", "all")
ATTENTION_REGIONS = ("class", "window")
SELECT_RULES = ("attention", "attention_and_iou")


class StageRecorder:
    """Context manager recording (and optionally replacing) the outputs of a network's stage modules.

    `with StageRecorder(model.stage_modules()) as recorder: logits = model(x)`; then `recorder.features()`
    lists each module's output in module order (the last call's, if a module ran twice). With
    `transform(index, output) -> tensor` the hook returns the transformed tensor, which then feeds the
    next stage and is what is recorded (RWS stage 3 blends this way).
    """

    def __init__(self, modules: Iterable[nn.Module],
                 transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        self.modules, self.transform = list(modules), transform
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.transform is not None:
                output = self.transform(index, output)
            self.outputs[index] = output
            return output
        return hook

    def features(self) -> list[torch.Tensor]:
        """Return the recorded outputs, one per module, in module order."""
        missing = [index for index in range(len(self.modules)) if index not in self.outputs]
        if missing:
            raise ValueError(f"stage modules {missing} did not run inside the StageRecorder")
        return [self.outputs[index] for index in range(len(self.modules))]

    def __enter__(self) -> "StageRecorder":
        self.outputs = {}
        self._handles = [module.register_forward_hook(self._hook(index)) for index, module in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def seg_grad_cam_raw(features: Sequence[torch.Tensor], logits: torch.Tensor, classes: Sequence[int], *,
                     pixels: str = "argmax") -> list[torch.Tensor]:
    """Return the raw Seg-Grad-CAM maps H_i^c = ReLU(sum_k alpha_i^k F_i^k) (eq. 1), one detached float32
    [B, len(classes), h_i, w_i] per stage, each >= 0.

    features: stage outputs F_1..F_l [B, C_i, h_i, w_i] of the forward (run it in eval mode, with gradients)
    that gave logits [B, K, H, W]. The target S_c sums logit c over M_c: the pixels predicted c (`argmax`,
    an image with none gets zero maps) or every pixel (`all`); alpha_i^k is the spatial mean of dS_c/dF_i^k.
    One autograd.grad call over all stages per class; images of a batch do not interact (frozen BN).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, K, H, W], got {tuple(logits.shape)}")
    if not features or any(feature.dim() != 4 or feature.shape[0] != logits.shape[0] for feature in features):
        raise ValueError(f"features must be [B, C, h, w] tensors with B = {logits.shape[0]}")
    if pixels not in PIXEL_SETS:
        raise ValueError(f"pixels must be one of {PIXEL_SETS}, got {pixels!r}")
    if not classes or any(not 0 <= c < logits.shape[1] for c in classes):
        raise ValueError(f"classes must be a non-empty list of indices in 0..{logits.shape[1] - 1}, "
                         f"got {list(classes)}")
    prediction = logits.argmax(1)
    maps: list[list[torch.Tensor]] = [[] for _ in features]
    for c in classes:
        target = logits[:, c] if pixels == "all" else torch.where(prediction == c, logits[:, c], 0.0)
        gradients = torch.autograd.grad(target.sum(), list(features), retain_graph=True)
        for per_stage, feature, gradient in zip(maps, features, gradients):
            alpha = gradient.float().mean((2, 3), keepdim=True)
            per_stage.append(F.relu((alpha * feature.detach().float()).sum(1)))
    return [torch.stack(per_stage, 1) for per_stage in maps]


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Return maps [..., H, W] min-max normalised to [0, 1] over (H, W); a constant map becomes 0."""
    low, high = maps.amin((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1.0), 0.0)


def seg_grad_cam(features: Sequence[torch.Tensor], logits: torch.Tensor, classes: Sequence[int], *,
                 pixels: str = "argmax", size: tuple[int, int] | None = None) -> torch.Tensor:
    """Return Seg-Grad-CAM maps [B, l, len(classes), H, W] in [0, 1]: `seg_grad_cam_raw` upsampled bilinearly
    to size (default the logits' H, W), then min-max normalised per (image, layer, class) (G1)."""
    size = tuple(size or logits.shape[-2:])
    raw = seg_grad_cam_raw(features, logits, classes, pixels=pixels)
    return _minmax(torch.stack([F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
                                for maps in raw], 1))


def class_attention_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, pixels: str = "argmax",
                         skip_background: bool = True,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A [B, l, H, W] in [0, 1], logits [B, K, H, W] detached) for a segmenter with `stage_modules()`.

    A_i(m, n) = A_i^{label(m, n)}(m, n) (eq. 2, spec 3.1 item 5): the Seg-Grad-CAM map (`seg_grad_cam`) of the
    pixel's label class at stage i; 0 on ignore pixels and, with skip_background, on class 0.
    images: normalised [B, 3, H, W]; labels: (pseudo) masks [B, H, W] int. The model runs in its current mode
    (call eval() first: frozen BN) with gradients enabled; its logits must come at the input size.
    """
    if images.dim() != 4 or labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"need images [B, 3, H, W] and labels [B, H, W], got {tuple(images.shape)}, "
                         f"{tuple(labels.shape)}")
    labels = labels.to(images.device)
    with torch.enable_grad(), StageRecorder(model.stage_modules()) as recorder:
        logits = model(images.detach().requires_grad_(True))
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"logits {tuple(logits.shape)} are not at the label size {tuple(labels.shape[-2:])}")
    features = recorder.features()
    skipped = {ignore_index, 0} if skip_background else {ignore_index}
    classes = [c for c in torch.unique(labels).tolist() if c not in skipped]
    attention = torch.zeros(labels.shape[0], len(features), *labels.shape[-2:], device=labels.device)
    if classes:
        with torch.enable_grad():  # the targets' sums join the graph under an outer no_grad too (evaluate)
            maps = seg_grad_cam(features, logits, classes, pixels=pixels)
        for index, c in enumerate(classes):
            attention += maps[:, :, index] * (labels == c)[:, None]
    return attention, logits.detach()


def _window_spans(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    if length <= size:
        return [(0, length)]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return [(start, start + size) for start in starts]


def sliding_windows(height: int, width: int, *, size: int = 128, stride: int = 64) -> list[Box]:
    """Return the windows (y0, x0, y1, x1) of an image, row-major: offsets at multiples of stride plus a last
    window flush with the bottom/right border where needed; along a side shorter than size, one window of
    the whole side (3.2 item 1, G5)."""
    if min(height, width, size, stride) < 1:
        raise ValueError(f"height, width, size and stride must be positive, got {height}, {width}, {size}, {stride}")
    return [(y0, x0, y1, x1) for y0, y1 in _window_spans(height, size, stride)
            for x0, x1 in _window_spans(width, size, stride)]


def slice_iou(prediction: np.ndarray, label: np.ndarray, cls: int, *, ignore_index: int = IGNORE_INDEX) -> float | None:
    """Return the IoU of class cls between prediction and label [h, w] (ignore pixels dropped), None when
    cls is in neither (undefined)."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in shape")
    valid = label != ignore_index
    predicted, labelled = (prediction == cls) & valid, label == cls
    union = int((predicted | labelled).sum())
    return None if union == 0 else float((predicted & labelled).sum()) / union


@dataclass(frozen=True)
class WindowScore:
    """One (image, window, class) of 3.2 item 2: mean attention and slice IoU, both in [0, 1]."""
    image: str
    box: Box
    cls: int
    attention: float
    iou: float


def window_scores(image: str, attention: np.ndarray, prediction: np.ndarray, label: np.ndarray,
                  windows: Iterable[Box], *, min_coverage: float = 0.01, region: str = "class",
                  skip_background: bool = True, ignore_index: int = IGNORE_INDEX) -> list[WindowScore]:
    """Return a WindowScore per window and per class in the window's label (3.2 item 2, G4, G20).

    attention [H, W] in [0, 1]: the class-restricted map to average (the [REC] last stage A_l, or Gamma);
    prediction, label [H, W] int. Classes covering less than min_coverage of the window's pixels, ignore and
    (skip_background) class 0 are skipped. region 'class' averages over the class pixels; 'window' averages
    the class-c map (zero off class c) over the window's non-ignore pixels. The IoU is `slice_iou`.
    """
    attention, prediction, label = np.asarray(attention), np.asarray(prediction), np.asarray(label)
    if not attention.shape == prediction.shape == label.shape or attention.ndim != 2:
        raise ValueError(f"attention, prediction, label must share one [H, W], got {attention.shape}, "
                         f"{prediction.shape}, {label.shape}")
    if region not in ATTENTION_REGIONS:
        raise ValueError(f"region must be one of {ATTENTION_REGIONS}, got {region!r}")
    skipped = {ignore_index, 0} if skip_background else {ignore_index}
    scores = []
    for y0, x0, y1, x1 in windows:
        window_label, window_attention = label[y0:y1, x0:x1], attention[y0:y1, x0:x1]
        for c in (int(c) for c in np.unique(window_label) if int(c) not in skipped):
            mask = window_label == c
            if mask.sum() < min_coverage * mask.size:
                continue
            if region == "class":
                mean = float(window_attention[mask].mean())
            else:
                mean = float(window_attention[mask].sum() / (window_label != ignore_index).sum())
            iou = slice_iou(prediction[y0:y1, x0:x1], window_label, c, ignore_index=ignore_index)
            scores.append(WindowScore(image, (y0, x0, y1, x1), c, mean, iou))
    return scores


@dataclass(frozen=True)
class ClassCurve:
    """One class's attention/IoU curve over its kept bins (>= min_count windows), and its T_c (None when it
    has fewer than min_bins kept bins)."""
    centres: np.ndarray
    mean_iou: np.ndarray
    counts: np.ndarray
    threshold: float | None


@dataclass(frozen=True)
class Threshold:
    """T (the mean of the T_c that exist) and every class's curve."""
    value: float
    curves: dict[int, ClassCurve]

    @property
    def per_class(self) -> dict[int, float]:
        """Return T_c of the classes averaged into T."""
        return {c: curve.threshold for c, curve in self.curves.items() if curve.threshold is not None}


def attention_threshold(scores: Iterable[WindowScore], *, bins: int = 20, min_count: int = 5,
                        slope: float = 0.02, min_bins: int = 3) -> Threshold:
    """Return the weak-slice threshold T (3.2 item 3 [REC], G6) from window scores.

    Per class: attention in `bins` equal bins on [0, 1] (1.0 in the top bin), bins with fewer than min_count
    windows dropped, mean IoU per kept bin, forward-difference slopes between consecutive kept bins;
    T_c = centre of the first kept bin whose forward slope is < slope, else of the highest kept bin.
    T = mean of T_c over classes with at least min_bins kept bins.
    """
    if bins < 1 or min_count < 1 or min_bins < 1:
        raise ValueError(f"bins, min_count and min_bins must be positive, got {bins}, {min_count}, {min_bins}")
    by_class: dict[int, list[tuple[float, float]]] = {}
    for score in scores:
        if not (0.0 <= score.attention <= 1.0 and 0.0 <= score.iou <= 1.0):
            raise ValueError(f"attention and IoU must lie in [0, 1], got {score}")
        by_class.setdefault(score.cls, []).append((score.attention, score.iou))
    curves = {}
    for c, pairs in sorted(by_class.items()):
        attention, iou = np.array(pairs).T
        index = np.minimum((attention * bins).astype(int), bins - 1)
        counts = np.bincount(index, minlength=bins)
        kept = np.flatnonzero(counts >= min_count)
        centres = (kept + 0.5) / bins
        means = np.array([iou[index == b].mean() for b in kept])
        threshold = None
        if len(kept) >= min_bins:
            slopes = np.diff(means) / np.diff(centres)
            flat = np.flatnonzero(slopes < slope)
            threshold = float(centres[flat[0]] if len(flat) else centres[-1])
        curves[c] = ClassCurve(centres, means, counts[kept], threshold)
    thresholds = [curve.threshold for curve in curves.values() if curve.threshold is not None]
    if not thresholds:
        raise ValueError(f"no class has {min_bins} attention bins of {min_count} windows: too few windows for T")
    return Threshold(float(np.mean(thresholds)), curves)


def curve_iou(threshold: Threshold, value: float) -> dict[int, float]:
    """Return each class's curve IoU at attention `value` (linear between kept-bin centres, flat beyond):
    the IoU bound of the attention_and_iou rule (G3)."""
    return {c: float(np.interp(value, curve.centres, curve.mean_iou))
            for c, curve in threshold.curves.items() if len(curve.centres)}


def select_weak_slices(scores: Iterable[WindowScore], threshold: float, *, rule: str = "attention",
                       iou_bounds: Mapping[int, float] | None = None,
                       max_per_image: int | None = 16) -> list[WindowScore]:
    """Return the weak slices, one per (image, window, class): attention < threshold (3.2 item 4), and with
    rule 'attention_and_iou' also IoU < iou_bounds[cls] (G3; a class without a bound is tested on attention
    only). Per image at most max_per_image (None: all), lowest attention first (G5); images keep their
    first-appearance order, slices within an image ascend in attention (stable)."""
    if rule not in SELECT_RULES:
        raise ValueError(f"rule must be one of {SELECT_RULES}, got {rule!r}")
    if max_per_image is not None and max_per_image < 1:
        raise ValueError(f"max_per_image must be positive or None, got {max_per_image}")
    if rule == "attention_and_iou" and iou_bounds is None:
        raise ValueError("rule 'attention_and_iou' needs iou_bounds (see curve_iou)")
    by_image: dict[str, list[WindowScore]] = {}
    for score in scores:
        if score.attention < threshold and (rule == "attention" or score.iou < iou_bounds.get(score.cls, math.inf)):
            by_image.setdefault(score.image, []).append(score)
    return [score for weak in by_image.values()
            for score in sorted(weak, key=lambda score: score.attention)[:max_per_image]]


def local_slices(weak: Iterable[WindowScore]) -> list[tuple[str, Box]]:
    """Return the local network's dataset: the distinct (image, box) of the weak slices, in first-appearance
    order (a window selected by two classes is kept once, 3.3 item 1)."""
    return list(dict.fromkeys((score.image, score.box) for score in weak))


class BlendWeights(NamedTuple):
    """Per layer on the image grid: beta = sel * (1 - lambda) [l, H, W] float32 and the owning slice's index
    owner [l, H, W] int64 (-1 where unselected)."""
    beta: torch.Tensor
    owner: torch.Tensor


def _relative(attention: torch.Tensor) -> torch.Tensor:
    """Return A_i / Gamma for attention [l, h, w] (Gamma = max over layers), 0 where Gamma = 0."""
    gamma = attention.amax(0, keepdim=True)
    return torch.where(gamma > 0, attention / torch.where(gamma > 0, gamma, 1.0), 0.0)


def blend_weights(attention: torch.Tensor, boxes: Sequence[Box], slice_attention: Sequence[torch.Tensor], *,
                  eps: float = 1e-6, no_omega: bool = False, no_lambda: bool = False, lambda_constant: float = 0.5,
                  layers: Sequence[int] | None = None) -> BlendWeights:
    """Return the blend strengths and owners of one image's weak slices (eqs. 3-7, 3.4 items 1-3, 3.5, G10).

    attention: the global net's A [l, H, W] (`class_attention_maps`); boxes: the weak slices; slice_attention:
    the local net's A^s [l, y1 - y0, x1 - x0] per slice, masked to its class. (pixel, layer i) is selected by
    a slice when Gamma - A_i > eps, A^s_i > A_i and r^s_i > r_i (r = A / Gamma, 0 where Gamma = 0); no_omega
    selects every pixel of the slice. Among the slices selecting it the one with the largest r^s_i owns it
    (ties: larger A^s_i, then the smaller box), so the result does not depend on slice order.
    lambda_i = r_i / (r_i + r^s_i) (eq. 7; lambda_constant where both are 0), or lambda_constant with
    no_lambda. layers: the 1-based stages blended (default all); the others get beta 0.
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must be [l, H, W], got {tuple(attention.shape)}")
    if len(boxes) != len(slice_attention):
        raise ValueError(f"{len(boxes)} boxes but {len(slice_attention)} slice maps")
    count, height, width = attention.shape
    chosen = set(range(1, count + 1) if layers is None else layers)
    if not chosen <= set(range(1, count + 1)):
        raise ValueError(f"layers must lie in 1..{count}, got {sorted(chosen)}")
    blended = torch.tensor([index + 1 in chosen for index in range(count)], device=attention.device)[:, None, None]
    attention = attention.float()
    relative = _relative(attention)
    best_relative = torch.full_like(attention, -1.0)
    best_local = torch.zeros_like(attention)
    owner = torch.full(attention.shape, -1, dtype=torch.int64, device=attention.device)
    lam = torch.ones_like(attention)
    for index in sorted(range(len(boxes)), key=lambda index: (tuple(boxes[index]), index)):
        y0, x0, y1, x1 = boxes[index]
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise ValueError(f"box {tuple(boxes[index])} is not inside the {height}x{width} image")
        local = slice_attention[index].float()
        if local.shape != (count, y1 - y0, x1 - x0):
            raise ValueError(f"slice map {tuple(local.shape)} does not match box {tuple(boxes[index])} "
                             f"with {count} layers")
        window = (slice(None), slice(y0, y1), slice(x0, x1))
        glob, glob_relative, local_relative = attention[window], relative[window], _relative(local)
        if no_omega:
            selected = blended.expand_as(local)
        else:
            omega = glob.amax(0, keepdim=True) - glob
            selected = blended & (omega > eps) & (local > glob) & (local_relative > glob_relative)
        better = selected & ((local_relative > best_relative[window])
                             | ((local_relative == best_relative[window]) & (local > best_local[window])))
        total = glob_relative + local_relative
        slice_lambda = torch.where(total > 0, glob_relative / torch.where(total > 0, total, 1.0), lambda_constant)
        if no_lambda:
            slice_lambda = torch.full_like(slice_lambda, lambda_constant)
        best_relative[window] = torch.where(better, local_relative, best_relative[window])
        best_local[window] = torch.where(better, local, best_local[window])
        owner[window] = torch.where(better, index, owner[window])
        lam[window] = torch.where(better, slice_lambda, lam[window])
    return BlendWeights(torch.where(owner >= 0, 1.0 - lam, 0.0), owner)


def pool_to_grid(beta: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Return beta [..., H, W] averaged over stride x stride pixel blocks, [..., h, w] float32 (a partial block
    at the bottom/right border averages its own pixels); size (h, w) must be (ceil(H/stride), ceil(W/stride))."""
    if beta.dim() < 2 or stride < 1:
        raise ValueError(f"need beta [..., H, W] and a positive stride, got {tuple(beta.shape)}, {stride}")
    height, width = beta.shape[-2:]
    if tuple(size) != (math.ceil(height / stride), math.ceil(width / stride)):
        raise ValueError(f"a {height}x{width} image at stride {stride} does not give the grid {tuple(size)}")
    pooled = F.avg_pool2d(beta.float().reshape(-1, 1, height, width), stride, stride, ceil_mode=True)
    return pooled.reshape(*beta.shape[:-2], *size)
