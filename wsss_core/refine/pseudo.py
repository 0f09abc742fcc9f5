"""Turning refined scores into pseudo masks."""
from __future__ import annotations

import numpy as np

from wsss_core.cams.store import CamStore
from wsss_core.data.palette import VOID


def argmax_labels(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Return uint8 [H, W] class indices of argmax over scores [k+1, H, W] (channel 0 background, then keys)."""
    return np.concatenate([[0], keys]).astype(np.uint8)[scores.argmax(0)]


def rw_labels(store: CamStore, image_id: str) -> np.ndarray:
    """Return uint8 [H, W]: argmax over the stored [background, cams] of a random-walk store."""
    cam, keys = store.read(image_id)
    background = store.read(image_id, "background")[0]
    return argmax_labels(np.concatenate([background[None], cam]), keys)


def disagreement_to_void(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Return labels with 255 wherever a second label map disagrees (the uncertain pixels)."""
    return np.where(labels == other, labels, VOID).astype(np.uint8)
