"""Stage `evaluate`: val mIoU of the segmentation network (optionally multi-scale + flip + dense CRF)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from stages._common import MANIFEST, PARAMS_FILE, crf_settings, load_params, reports_errors, single_command
from stages.train_seg import CHECKPOINT
from wsss_core.checkpoint import load_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.errors import DataError
from wsss_core.metrics import ConfusionMatrix, iou_report
from wsss_core.seg.infer import SEG_CHECKPOINT_KEYS, iterate_segmentations, segmenter_from_checkpoint
from wsss_core.training import resolve_device
from wsss_core.viz import prediction_row, save_confusion_heatmap, vstack
from wsss_core.io import atomic_path, save_image, write_json

METRICS = Path("metrics/seg.json")
PER_CLASS_PLOT = Path("plots/seg_per_class.json")
CONFUSION_PLOT = Path("plots/seg_confusion.png")
MONTAGE = Path("plots/seg_val.png")


@reports_errors
def evaluate(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Score models/seg.pt on the val split; writes metrics/seg.json, per-class and confusion plots, a montage."""
    params = load_params(params_file)
    settings = params.seg
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("val")
    if not ids:
        raise DataError(f"{MANIFEST}: the val split is empty, nothing to evaluate")
    checkpoint = load_checkpoint(CHECKPOINT, params.method, {key: getattr(settings, key) for key in SEG_CHECKPOINT_KEYS},
                                 "seg")
    model, _ = segmenter_from_checkpoint(checkpoint, CHECKPOINT)
    device = resolve_device(params.device)
    crf = crf_settings(params.crf) if settings.eval_crf else None
    matrix, rows = ConfusionMatrix(len(dataset.class_names)), []
    for image_id, image, labels in iterate_segmentations(model.to(device), dataset, ids, device,
                                                         settings.eval_scales, settings.eval_flip, crf, "evaluate"):
        truth = dataset.read_mask(image_id)
        matrix.update(labels, truth)
        if len(rows) < settings.montage_images:
            rows.append(prediction_row(image, labels, truth, image_id))
    report = iou_report(matrix.matrix, dataset.class_names)
    report["pixel_accuracy"] = float(np.trace(matrix.matrix) / max(matrix.matrix.sum(), 1))
    report["protocol"] = {"split": "val", "images": len(ids), "scales": settings.eval_scales,
                          "flip": settings.eval_flip, "crf": settings.eval_crf}
    write_json(METRICS, report)
    write_json(PER_CLASS_PLOT, {"per_class": [{"class": name, "iou": iou}
                                              for name, iou in report["per_class"].items() if iou is not None]})
    with atomic_path(CONFUSION_PLOT) as temporary:
        save_confusion_heatmap(matrix.matrix, dataset.class_names, temporary)
    if rows:
        save_image(MONTAGE, vstack(rows))
    typer.echo(f"val mIoU {report['miou']:.4f} over {len(ids)} images (scales {settings.eval_scales}, "
               f"flip {settings.eval_flip}, crf {settings.eval_crf})")


app = single_command(evaluate)

if __name__ == "__main__":
    app()
