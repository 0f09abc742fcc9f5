"""Turning refined scores into pseudo masks, from whichever source the `pseudo` params name."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from wsss_core.cams.labels import argmax_labels, cam_labels
from wsss_core.cams.store import CamStore
from wsss_core.config import PseudoParams
from wsss_core.data.label_dir import check_label_dir, read_label_dir
from wsss_core.data.palette import VOID
from wsss_core.pipeline import compared_source, sources_used


def rw_labels(store: CamStore, image_id: str) -> np.ndarray:
    """Return uint8 [H, W]: argmax over the stored [background, cams] of a random-walk store."""
    cam, keys = store.read(image_id)
    background = store.read(image_id, "background")[0]
    return argmax_labels(np.concatenate([background[None], cam]), keys)


def export_labels(store: CamStore, image_id: str) -> np.ndarray:
    """Return uint8 [H, W]: argmax of the method's own segmentation ('seg' [k+1, H, W]) stored by export_cams."""
    return argmax_labels(*store.read(image_id, "seg"))


def disagreement_to_void(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Return labels with 255 wherever a second label map disagrees (the uncertain pixels)."""
    return np.where(labels == other, labels, VOID).astype(np.uint8)


class PseudoMaskSources(contextlib.ExitStack):
    """`with PseudoMaskSources(pseudo, ids, ...) as sources: sources.labels(id)`: one image's pseudo mask.

    Opens only the artifacts the params use (and checks that they cover ids): the refined CAM store
    (source cam, thresholded at seed_bg_threshold), the random-walk store (rw), the CRF label folder
    (crf) or the exported store's 'seg' maps (export).
    """

    def __init__(self, pseudo: PseudoParams, ids: list[str], *, refined: Path, walked: Path, crf_dir: Path,
                 exported: Path, seed_bg_threshold: float):
        super().__init__()
        self.pseudo, self.ids = pseudo, ids
        self.paths = {"cam": refined, "rw": walked, "crf": crf_dir, "export": exported}
        self.seed_bg_threshold = seed_bg_threshold
        self.readers: dict = {}

    def __enter__(self) -> "PseudoMaskSources":
        super().__enter__()
        for source in sorted(sources_used(self.pseudo)):
            path = self.paths[source]
            if source == "crf":
                check_label_dir(path, self.ids, "dcrf")
                self.readers[source] = lambda image_id, path=path: read_label_dir(path, image_id)
                continue
            store = self.enter_context(CamStore(path))
            store.check_covers(self.ids)
            self.readers[source] = {
                "cam": lambda image_id, store=store: cam_labels(*store.read(image_id), self.seed_bg_threshold),
                "rw": lambda image_id, store=store: rw_labels(store, image_id),
                "export": lambda image_id, store=store: export_labels(store, image_id),
            }[source]
        self.other = compared_source(self.pseudo)
        return self

    def labels(self, image_id: str) -> np.ndarray:
        """Return uint8 [H, W] (0 background, classes, 255 where uncertain_to_void found disagreement)."""
        labels = self.readers[self.pseudo.source](image_id)
        if self.other:
            labels = disagreement_to_void(labels, self.readers[self.other](image_id))
        return labels
