"""Scoring CAMs as segmentation seeds: argmax over [background threshold, CAMs]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss_core.cams.calibration import part_body_activation
from wsss_core.cams.labels import cam_peaks
from wsss_core.cams.store import CamStore
from wsss_core.config import CamsParams, DataParams
from wsss_core.data.dataset import Dataset
from wsss_core.data.synthetic import SyntheticSpec
from wsss_core.metrics import (NO_MASKS, ConfusionMatrix, class_map_aucs, dataset_baselines, iou_report, map_correlations,
                              mean_average_precision, mean_or_none, scored_report)


def threshold_grid(start: float, stop: float, step: float) -> list[float]:
    """Return thresholds start, start+step, ..., stop (inclusive), rounded to 4 decimals."""
    count = int(round((stop - start) / step)) + 1
    return [round(start + index * step, 4) for index in range(count)]


def sweep_cams(store: CamStore, dataset: Dataset, ids: list[str], thresholds: list[float]
               ) -> tuple[list[np.ndarray], list[float], dict]:
    """Return (one confusion matrix [K+1, K+1] per background threshold, the ROC AUC of every (image, present
    class): metrics.class_map_aucs, the maps' activation) over the given ids.

    The activation uses no ground truth: {'mean_peak': the mean over pixels of the strongest labelled class's
    CAM (in [0, 1]), 'foreground_share': per threshold, the share of pixels whose strongest CAM exceeds it (the
    share the seeds call foreground)}. It says how broad a method's maps are against another's, so the
    downstream thresholds can be judged without masks."""
    matrices = [ConfusionMatrix(dataset.num_classes + 1) for _ in thresholds]
    aucs: list[float] = []
    peak_sum, pixels, above = 0.0, 0, np.zeros(len(thresholds), np.int64)
    for image_id in tqdm(ids, desc="evaluate CAMs", unit="img"):
        cam, keys = store.read(image_id)
        best_class, peak = cam_peaks(cam, keys)  # once per image, for every threshold
        target = dataset.read_mask(image_id)
        aucs += class_map_aucs(cam, keys, target)
        peak_sum += float(peak.sum(dtype=np.float64))
        pixels += peak.size
        for index, (matrix, threshold) in enumerate(zip(matrices, thresholds)):
            foreground = peak > threshold
            above[index] += int(foreground.sum())
            matrix.update(np.where(foreground, best_class, 0), target)
    activation = {"mean_peak": peak_sum / pixels if pixels else None,
                  "foreground_share": [int(count) / pixels if pixels else None for count in above]}
    return [matrix.matrix for matrix in matrices], aucs, activation


def classifier_map(store: CamStore, dataset: Dataset, ids: list[str]) -> float | None:
    """Return the classifier's mAP over ids from the image-level scores the export stored (None when the store
    holds none: a store written before scores were stored, or one without images)."""
    scores = [store.read_scores(image_id) for image_id in ids]
    if not ids or any(score is None for score in scores):
        return None
    value, _ = mean_average_precision(np.stack(scores), np.stack([dataset.label_vector(i) for i in ids]))
    return None if np.isnan(value) else value


def map_correlation(store: CamStore, reference: CamStore, ids: list[str]) -> float | None:
    """Return the mean over (image, class) of the Pearson correlation of store's maps with reference's
    (metrics.map_correlations): how much a refinement kept of its input; None when no pair is measurable."""
    values: list[float] = []
    for image_id in ids:
        values += map_correlations(store.read(image_id)[0], reference.read(image_id)[0])
    return mean_or_none(values)


def cam_metrics(store: CamStore, dataset: Dataset, ids: list[str], *, seed_bg_threshold: float,
                sweep: list[float], synthetic_spec: SyntheticSpec | None = None) -> dict:
    """Return {'miou', 'per_class', 'scored_images', 'seed_bg_threshold', 'auc', 'baselines', 'activation',
    'sweep': {...}} with mIoU in [0, 1], over the ids that have a ground-truth mask (miou None and the sweep
    skipped when none has).

    auc: the mean ROC AUC over (image, present class) of the class map on its class's pixels against
    background pixels, a threshold-free localisation score (0.5: none). baselines: the all-background and
    all-foreground mIoU of the same images (metrics.dataset_baselines). activation: {'mean_peak'} and the
    sweep's 'foreground_share' per threshold (sweep_cams; no ground truth used). The sweep's best threshold is
    tuned on ground truth, as papers' seed numbers usually are. With the synthetic set's spec,
    'synthetic_activation' says how partial the CAMs are (mean CAM on parts, bodies and background: the point
    of the synthetic set).
    """
    scored = dataset.scored_ids(ids)
    if not scored:  # tag-only images: nothing to score, nor to tune the threshold on
        report = {**scored_report(None, dataset.class_names, 0), "seed_bg_threshold": seed_bg_threshold,
                  "sweep": {"skipped": NO_MASKS}}
        if synthetic_spec is not None:
            report["synthetic_activation"] = part_body_activation(store, synthetic_spec, ids)
        return report
    thresholds = sorted(set(threshold_grid(*sweep)) | {round(seed_bg_threshold, 4)})
    matrices, aucs, activation = sweep_cams(store, dataset, scored, thresholds)
    reports = [iou_report(matrix, dataset.class_names) for matrix in matrices]
    configured = reports[thresholds.index(round(seed_bg_threshold, 4))]
    best = int(np.nanargmax([report["miou"] for report in reports]))
    report = {
        "miou": configured["miou"],
        "per_class": configured["per_class"],
        "scored_images": len(scored),
        "seed_bg_threshold": seed_bg_threshold,
        "auc": mean_or_none(aucs),
        "baselines": dataset_baselines(dataset, scored),
        "activation": {"mean_peak": activation["mean_peak"]},
        "sweep": {
            "note": "best background threshold tuned on ground truth",
            "best_threshold": thresholds[best],
            "best_miou": reports[best]["miou"],
            "thresholds": thresholds,
            "miou": [report["miou"] for report in reports],
            "foreground_share": activation["foreground_share"],
        },
    }
    if synthetic_spec is not None:
        report["synthetic_activation"] = part_body_activation(store, synthetic_spec, ids)
    return report


def score_cam_store(path: Path, dataset: Dataset, cams: CamsParams, data: DataParams,
                    classifier_store: Path | None = None, reference: Path | None = None) -> dict:
    """Return cam_metrics of the store at path over the train split, after checking that it covers it.

    'classifier_map': the classifier's mAP on the split, from the image-level scores in classifier_store
    (default: the store itself). With a reference store (a refinement's input), 'correlation_with_input' is
    map_correlation against it. On the synthetic set the report also holds the part/body calibration
    ('synthetic_activation').
    """
    ids = dataset.ids("train")
    spec = data.synthetic_spec()
    with CamStore(path) as store:
        store.check_covers(ids)
        report = cam_metrics(store, dataset, ids, seed_bg_threshold=cams.seed_bg_threshold, sweep=cams.sweep,
                             synthetic_spec=spec)
        if reference is not None:
            with CamStore(reference) as source:
                report["correlation_with_input"] = map_correlation(store, source, ids)
    with CamStore(classifier_store or path) as store:
        report["classifier_map"] = classifier_map(store, dataset, ids)
    return report


def describe_report(name: str, report: dict) -> str:
    """Return a CAM report's mIoU at the configured and the best threshold (and the calibration) as text."""
    if report["miou"] is None:
        return f"{name}: not scored ({report['reason']})"
    sweep = report["sweep"]
    baselines = report["baselines"]
    text = (f"{name} mIoU {report['miou']:.4f} at threshold {report['seed_bg_threshold']}; "
            f"best {sweep['best_miou']:.4f} at {sweep['best_threshold']} (tuned on GT); AUC {_number(report['auc'])}; "
            f"all background {baselines['all_background']:.4f}, all foreground {baselines['all_foreground']:.4f}; "
            f"mean peak activation {_number(report['activation']['mean_peak'])} (no GT)")
    if report.get("classifier_map") is not None:
        text += f"; classifier mAP {report['classifier_map']:.3f}"
    if report.get("correlation_with_input") is not None:
        text += f"; correlation with its input {report['correlation_with_input']:.3f}"
    if "synthetic_activation" in report:
        text += ("; mean CAM on parts / bodies / background: {part_mean:.3f} / {body_mean:.3f} / "
                 "{background_mean:.3f}".format(**report["synthetic_activation"]))
    return text


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
