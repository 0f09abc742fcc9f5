"""Per-image label-map jobs for a process pool: affinity labels from CAMs, CRF of random-walk scores.

Each job function is top level (picklable); its settings arrive through functools.partial.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

import numpy as np

from wsss_core.affinity.affinity_labels import irn_affinity_label_map, psa_affinity_label_map
from wsss_core.cams.labels import argmax_labels
from wsss_core.cams.store import CamStore
from wsss_core.config import AffinityParams, DcrfParams
from wsss_core.crf import crf_on_labels, dense_crf
from wsss_core.data.dataset import Dataset
from wsss_core.pool import run_pool


def affinity_label_job(job: tuple, settings: AffinityParams) -> tuple[str, np.ndarray]:
    """Return (id, uint8 [H, W] affinity label map) for job (id, image, cam [k, H, W], keys [k]).

    settings.label_mode picks PSA's or IRN's labels, each refined by its own paper's CRF
    (settings.psa_label_crf on PSA's score maps, settings.irn_label_crf on IRN's label maps).
    """
    image_id, image, cam, keys = job
    if settings.label_mode == "psa":
        crf = partial(dense_crf, settings=settings.psa_label_crf)
        return image_id, psa_affinity_label_map(image, cam, keys, settings.low_alpha, settings.high_alpha, crf=crf)
    crf = partial(crf_on_labels, settings=settings.irn_label_crf, label_confidence=settings.irn_label_confidence)
    return image_id, irn_affinity_label_map(image, cam, keys, settings.irn_fg_threshold, settings.irn_bg_threshold,
                                            crf_labels=crf)


def crf_job(job: tuple, settings: DcrfParams) -> tuple[str, np.ndarray]:
    """Return (id, uint8 [H, W] class labels) for job (id, image, scores [k+1, H, W], keys [k]).

    settings.unary 'scores': the scores (background first) normalised to a distribution per pixel
    (PSA); 'labels': their argmax as labels held with settings.label_confidence (IRN).
    """
    image_id, image, scores, keys = job
    if settings.unary == "labels":
        channels = crf_on_labels(image, scores.argmax(0), len(scores), settings, settings.label_confidence)
        return image_id, np.concatenate([[0], keys]).astype(np.uint8)[channels]
    probabilities = scores / np.maximum(scores.sum(0, keepdims=True), 1e-8)
    marginals = dense_crf(image, probabilities, settings)
    return image_id, argmax_labels(marginals, keys)


def store_jobs(store: CamStore, dataset: Dataset, ids: list[str], background: bool = False) -> Iterator[tuple]:
    """Yield (id, image uint8 [H, W, 3], maps, keys [k]) read lazily from a store.

    maps: the CAMs [k, H, W], or with background=True the scores [k+1, H, W] with the stored
    'background' map first (random-walk stores).
    """
    for image_id in ids:
        maps, keys = store.read(image_id)
        if background:
            maps = np.concatenate([store.read(image_id, "background")[0][None], maps])
        yield image_id, dataset.read_image(image_id), maps, keys


def map_jobs(function, store: CamStore, dataset: Dataset, ids: list[str], workers: int, desc: str,
             background: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Run function over every id's (image, maps) in a process pool; yield (id, labels) in id order."""
    return run_pool(function, store_jobs(store, dataset, ids, background), workers, total=len(ids), desc=desc)
