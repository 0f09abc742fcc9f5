"""Segmentation and classification metrics: confusion matrix, IoU, mAP."""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a [C, C] pixel confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose ground truth is 255 are ignored; predictions outside 0..C-1 raise.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Add one image (or a batch) of integer label maps of the same shape."""
        prediction = np.asarray(prediction).astype(np.int64).ravel()
        target = np.asarray(target).astype(np.int64).ravel()
        if prediction.shape != target.shape:
            raise ValueError(f"prediction has {prediction.size} pixels, target {target.size}")
        valid = target != IGNORE_INDEX
        prediction, target = prediction[valid], target[valid]
        if prediction.size and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"prediction labels must lie in 0..{self.num_classes - 1}")
        if target.size and target.max() >= self.num_classes:
            raise ValueError(f"target labels must lie in 0..{self.num_classes - 1} or be 255")
        self.matrix += np.bincount(
            target * self.num_classes + prediction, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Return per-class IoU as float64 [C]; NaN for a class absent from both GT and prediction."""
        return iou_from_confusion(self.matrix)

    def miou(self) -> float:
        """Return the mean IoU over classes present in GT or prediction (nanmean)."""
        return mean_iou(self.iou())


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Return per-class IoU TP / (TP + FP + FN) as float64 [C]; NaN where the union is empty."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


def mean_iou(per_class_iou: np.ndarray) -> float:
    """Return the nanmean of per-class IoU (NaN when every class is NaN)."""
    per_class_iou = np.asarray(per_class_iou, dtype=np.float64)
    if np.all(np.isnan(per_class_iou)):
        return float("nan")
    return float(np.nanmean(per_class_iou))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Return the non-interpolated average precision of one class (NaN without positives).

    scores: float [N]; positives: bool [N]. Ties are ranked in input order after a stable sort.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order]
    precision_at_rank = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at_rank[hits].mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Return (mAP over classes with positives, per-class AP float64 [K]) for multi-label scores.

    scores: float [N, K]; targets: {0,1} [N, K].
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets).astype(bool)
    per_class = np.array(
        [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    )
    return mean_iou(per_class), per_class


NO_MASKS = "no ground-truth masks"


def scored_report(matrix: np.ndarray, class_names: list[str], scored_images: int) -> dict:
    """Return iou_report plus 'scored_images', or, when no image had a mask to score against,
    {'miou': None, 'per_class': {}, 'scored_images': 0, 'reason': 'no ground-truth masks'}."""
    if not scored_images:
        return {"miou": None, "per_class": {}, "scored_images": 0, "reason": NO_MASKS}
    return {**iou_report(matrix, class_names), "scored_images": scored_images}


def describe_miou(report: dict) -> str:
    """Return 'mIoU 0.1234' (with the coverage where the report has one), or 'not scored (<reason>)'."""
    if report["miou"] is None:
        return f"not scored ({report['reason']})"
    coverage = f", coverage {report['coverage']:.1%}" if report.get("coverage") is not None else ""
    return f"mIoU {report['miou']:.4f}{coverage}"


def iou_report(matrix: np.ndarray, class_names: list[str]) -> dict:
    """Return {'miou', 'per_class': {name: iou or None}} with IoU as fractions in [0, 1]."""
    per_class = iou_from_confusion(matrix)
    return {
        "miou": mean_iou(per_class),
        "per_class": {
            name: (None if np.isnan(value) else float(value))
            for name, value in zip(class_names, per_class)
        },
    }


def trivial_baselines(masks_and_keys, num_classes: int) -> dict:
    """Return {'all_background', 'all_foreground'}: the mIoU (in [0, 1]) of two predictions that need no model.

    masks_and_keys: iterable of (ground-truth mask uint8 [H, W] with 255 ignored, the image's tagged classes
    1..K). All background labels every pixel 0. All foreground labels every pixel with the image's first
    tagged class: a map that is 1 everywhere for every tagged class, labelled like a CAM (ties go to the
    first class); an image without tags stays background. num_classes counts background.
    """
    background, foreground = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    for mask, keys in masks_and_keys:
        background.update(np.zeros_like(mask), mask)
        foreground.update(np.full_like(mask, keys[0] if len(keys) else 0), mask)
    return {"all_background": background.miou(), "all_foreground": foreground.miou()}


def dataset_baselines(dataset, ids: list[str]) -> dict:
    """Return trivial_baselines over the ids of a data.dataset.Dataset that have a mask; None for both when
    none has one."""
    scored = dataset.scored_ids(ids)
    if not scored:
        return {"all_background": None, "all_foreground": None}
    return trivial_baselines(((dataset.read_mask(i), dataset.labels[i]) for i in scored), dataset.num_classes + 1)


def midranks(values: np.ndarray) -> np.ndarray:
    """Return the 1-based ranks of values [N], ties sharing the mean of their ranks (float64 [N])."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Return the ROC AUC of scores on positive [P] against negative [N] samples (NaN if either is empty).

    The Mann-Whitney statistic: the probability that a random positive scores above a random negative,
    ties counted half. 0.5: no separation; below 0.5: inverted.
    """
    positive, negative = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if not positive.size or not negative.size:
        return float("nan")
    ranks = midranks(np.concatenate([positive, negative]))
    return float((ranks[:positive.size].sum() - positive.size * (positive.size + 1) / 2)
                 / (positive.size * negative.size))


def class_map_aucs(maps: np.ndarray, keys, mask: np.ndarray) -> list[float]:
    """Return one ROC AUC per tagged class present in the mask: maps[i] on class keys[i]'s pixels against
    the background (0) pixels (other classes' and ignored pixels left out); [] without background pixels.

    maps: [k, H, W] class maps for keys [k]; mask: uint8 [H, W] ground truth (255 ignored).
    """
    background = mask == 0
    if not background.any():
        return []
    return [roc_auc(class_map[mask == key], class_map[background])
            for class_map, key in zip(np.asarray(maps, np.float32), keys) if (mask == key).any()]


def map_correlations(maps: np.ndarray, references: np.ndarray) -> list[float]:
    """Return the Pearson correlation of each class map [k, H, W] with its reference [k, H, W] over the
    pixels; a pair where either map is constant is left out."""
    values = []
    for a, b in zip(np.asarray(maps, np.float64), np.asarray(references, np.float64)):
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        norm = np.sqrt((a * a).sum() * (b * b).sum())
        if norm > 0:
            values.append(float((a * b).sum() / norm))
    return values


def mean_or_none(values) -> float | None:
    """Return the mean of finite values, or None when there is none (a JSON-friendly 'not measured')."""
    values = [value for value in values if np.isfinite(value)]
    return float(np.mean(values)) if values else None
