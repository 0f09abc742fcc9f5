"""Stage `evaluate`: val mIoU of the segmentation network (optionally multi-scale + flip + dense CRF), and of
the method's own segmentation branch where it has one (one-step)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import (CLS_CHECKPOINT, MANIFEST, PARAMS_FILE, RWS_REPORT, SEG_CHECKPOINT, SEG_CONFUSION_PLOT,
                              SEG_METRICS, SEG_MONTAGE, SEG_ONESTEP_METRICS, SEG_PER_CLASS_PLOT)
from wsss_core.checkpoint import load_checkpoint
from wsss_core.config import CrfParams, SegParams
from wsss_core.data.dataset import Dataset
from wsss_core.errors import DataError
from wsss_core.io import atomic_path, save_image, write_json
from wsss_core.methods import get_method
from wsss_core.metrics import ConfusionMatrix, dataset_baselines, describe_miou, scored_report
from wsss_core.seg.infer import SEG_CHECKPOINT_KEYS, iterate_segmentations, segmenter_from_checkpoint
from wsss_core.seg.rws_blend import LAST_THRESHOLD, LOCAL_NETWORK, RwsBlendedSegmenter
from wsss_core.training import resolve_device
from wsss_core.viz import prediction_row, save_confusion_heatmap, vstack


def score_val(model: nn.Module, dataset: Dataset, ids: list[str], settings: SegParams, crf: CrfParams | None,
              device: torch.device, desc: str) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """Return (report with miou, per_class, scored_images, pixel_accuracy, baselines (all background / all
    foreground on the same images) and protocol; confusion matrix; montage
    rows). Images without a ground-truth mask are drawn but not scored (miou None when none has one)."""
    matrix, rows, scored = ConfusionMatrix(len(dataset.class_names)), [], 0
    for image_id, image, labels in iterate_segmentations(model.to(device), dataset, ids, device,
                                                         settings.eval_scales, settings.eval_flip, crf, desc):
        truth = dataset.read_mask(image_id) if dataset.has_mask(image_id) else None
        if truth is not None:
            matrix.update(labels, truth)
            scored += 1
        if len(rows) < settings.montage_images:
            rows.append(prediction_row(image, labels, truth, image_id))
    report = scored_report(matrix.matrix, dataset.class_names, scored)
    if scored:
        report["pixel_accuracy"] = float(np.trace(matrix.matrix) / max(matrix.matrix.sum(), 1))
        report["baselines"] = dataset_baselines(dataset, ids)
    report["protocol"] = {"split": "val", "images": scored, "scales": settings.eval_scales,
                          "flip": settings.eval_flip, "crf": settings.eval_crf}
    return report, matrix.matrix, rows


def rws_blend_report(model: nn.Module, dataset: Dataset, ids: list[str], settings: SegParams, crf: CrfParams | None,
                     device: torch.device) -> dict:
    """Return the val scores of the network blended at test time (`RwsBlendedSegmenter`, with rws/'s local network and
    T): miou, per_class, blended_inputs, threshold; miou None and `skipped` when no RWS round blended."""
    try:
        threshold = json.loads((RWS_REPORT / "report.json").read_text(encoding="utf-8")).get(LAST_THRESHOLD)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise DataError(f"{RWS_REPORT / 'report.json'}: unreadable RWS report ({err})") from None
    if threshold is None:
        return {"miou": None, "skipped": "no RWS round blended, so there is no local network"}
    local = copy.deepcopy(model)
    try:
        local.load_state_dict(torch.load(RWS_REPORT / LOCAL_NETWORK, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"{RWS_REPORT / LOCAL_NETWORK}: not the local network of this segmenter ({err})") from None
    blend = RwsBlendedSegmenter(model, local.to(device), settings.rws, threshold)
    scores, _, _ = score_val(blend, dataset, ids, settings, crf, device, "evaluate rws blend")
    return {"miou": scores["miou"], "per_class": scores["per_class"], "blended_inputs": blend.blended_inputs,
            "threshold": threshold, "protocol": "test-time blending, spec 3.7's optional variant (not the paper's)"}


@reports_errors
def evaluate(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Score models/seg.pt on the val split; writes metrics/seg.json (with seg.eval_rws_blend also the test-time
    blended network's scores), per-class and confusion plots, a montage, and metrics/seg_onestep.json (the
    method's own segmentation branch, or null without one)."""
    params = load_params(params_file)
    settings = params.seg
    method = get_method(params)
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("val")
    if not ids:
        raise DataError(f"{MANIFEST}: the val split is empty, nothing to evaluate")
    checkpoint = load_checkpoint(SEG_CHECKPOINT, params.method,
                                 {"seg": {key: getattr(settings, key) for key in SEG_CHECKPOINT_KEYS}})
    model, _ = segmenter_from_checkpoint(checkpoint, SEG_CHECKPOINT)
    device = resolve_device(params.device)
    crf = params.crf if settings.eval_crf else None
    report, matrix, rows = score_val(model, dataset, ids, settings, crf, device, "evaluate")
    if settings.eval_rws_blend:
        report["test_time_blend"] = rws_blend_report(model, dataset, ids, settings, crf, device)
        typer.echo(f"RWS blended at test time: val mIoU {report['test_time_blend']['miou']}")
    write_json(SEG_METRICS, report)
    write_json(SEG_PER_CLASS_PLOT, {"per_class": [{"class": name, "iou": iou}
                                                  for name, iou in report["per_class"].items() if iou is not None]})
    with atomic_path(SEG_CONFUSION_PLOT) as temporary:
        save_confusion_heatmap(matrix, dataset.class_names, temporary)
    if rows:
        save_image(SEG_MONTAGE, vstack(rows))
    typer.echo(f"val {describe_miou(report)} over {report['protocol']['images']} of {len(ids)} images (scales "
               f"{settings.eval_scales}, flip {settings.eval_flip}, crf {settings.eval_crf})")

    if method.has_segmenter:
        branch = method.segmenter(method.load_classifier(CLS_CHECKPOINT, params.cls, dataset.num_classes))
        onestep, _, _ = score_val(branch, dataset, ids, settings, crf, device, "evaluate one-step")
        typer.echo(f"one-step (the method's segmentation branch): val {describe_miou(onestep)}")
    else:
        onestep = {"miou": None, "per_class": {}, "skipped": f"method {params.method!r} has no segmentation branch"}
    write_json(SEG_ONESTEP_METRICS, onestep)


app = single_command(evaluate)

if __name__ == "__main__":
    app()
