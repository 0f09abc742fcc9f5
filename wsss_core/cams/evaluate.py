"""Scoring CAMs as segmentation seeds: argmax over [background threshold, CAMs]."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.metrics import ConfusionMatrix, iou_report


def cam_peaks(cam: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (class index of the strongest CAM, its value), each [H, W]; (0, 0) where k = 0.

    cam: [k, H, W] for classes keys [k].
    """
    if cam.shape[0] == 0:
        return np.zeros(cam.shape[1:], np.uint8), np.zeros(cam.shape[1:], cam.dtype)
    return np.asarray(keys, dtype=np.uint8)[cam.argmax(0)], cam.max(0)


def cam_labels(cam: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Return uint8 [H, W]: keys[argmax_c cam] where max_c cam > bg_threshold, else 0.

    The background score is the constant threshold, and ties go to background (argmax over
    [threshold, cam...] picks the first maximum).
    """
    best_class, peak = cam_peaks(cam, keys)
    return np.where(peak > bg_threshold, best_class, 0).astype(np.uint8)


def threshold_grid(start: float, stop: float, step: float) -> list[float]:
    """Return thresholds start, start+step, ..., stop (inclusive), rounded to 4 decimals."""
    count = int(round((stop - start) / step)) + 1
    return [round(start + index * step, 4) for index in range(count)]


def sweep_cams(store: CamStore, dataset: Dataset, ids: list[str], thresholds: list[float]) -> list[np.ndarray]:
    """Return one confusion matrix [K+1, K+1] per background threshold over the given ids."""
    matrices = [ConfusionMatrix(dataset.num_classes + 1) for _ in thresholds]
    for image_id in tqdm(ids, desc="evaluate CAMs", unit="img"):
        best_class, peak = cam_peaks(*store.read(image_id))  # once per image, for every threshold
        target = dataset.read_mask(image_id)
        for matrix, threshold in zip(matrices, thresholds):
            matrix.update(np.where(peak > threshold, best_class, 0), target)
    return [matrix.matrix for matrix in matrices]


def cam_metrics(store: CamStore, dataset: Dataset, ids: list[str], bg_threshold: float,
                sweep: list[float]) -> dict:
    """Return {'miou', 'per_class', 'bg_threshold', 'sweep': {...}} with mIoU in [0, 1].

    The sweep's best threshold is tuned on ground truth, as papers' seed numbers usually are.
    """
    thresholds = sorted(set(threshold_grid(*sweep)) | {round(bg_threshold, 4)})
    matrices = sweep_cams(store, dataset, ids, thresholds)
    reports = [iou_report(matrix, dataset.class_names) for matrix in matrices]
    configured = reports[thresholds.index(round(bg_threshold, 4))]
    best = int(np.nanargmax([report["miou"] for report in reports]))
    return {
        "miou": configured["miou"],
        "per_class": configured["per_class"],
        "bg_threshold": bg_threshold,
        "sweep": {
            "note": "best background threshold tuned on ground truth",
            "best_threshold": thresholds[best],
            "best_miou": reports[best]["miou"],
            "thresholds": thresholds,
            "miou": [report["miou"] for report in reports],
        },
    }
