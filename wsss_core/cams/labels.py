"""Scores to labels, in one place: a constant background threshold against the strongest CAM (the CAM sweep,
the `cams` pseudo-mask source, the mask pictures), or an argmax over scores with a background channel first
(the random walk, the label CRF, the `rw` and `export` pseudo-mask sources)."""
from __future__ import annotations

import numpy as np


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


def argmax_labels(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Return uint8 [H, W] class indices of argmax over scores [k+1, H, W] (channel 0 background, then keys)."""
    return np.concatenate([[0], keys]).astype(np.uint8)[scores.argmax(0)]
