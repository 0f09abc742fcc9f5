"""Stage `affinity_labels`: confident fg/bg/ignore label maps from the refined CAMs (PSA or IRN)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, crf_settings, load_params, reports_errors, single_command
from stages.refine import REFINED_STORE
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.refine.label_jobs import affinity_label_job, map_jobs
from wsss_core.io import write_json

LABEL_DIR = Path("labels/affinity")
METRICS = Path("metrics/affinity_labels.json")


@reports_errors
def affinity_labels(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write labels/affinity/<id>.png (0 bg, classes, 255 unsure) and their precision on GT."""
    params = load_params(params_file)
    settings = params.affinity
    dataset = Dataset.load(MANIFEST)
    job = partial(affinity_label_job, mode=settings.label_mode, low_alpha=settings.low_alpha,
                  high_alpha=settings.high_alpha, fg_threshold=settings.fg_threshold,
                  bg_threshold=settings.bg_threshold, settings=crf_settings(settings.label_crf))
    ids = dataset.ids("train")
    with CamStore(REFINED_STORE) as store, LabelDirWriter(LABEL_DIR, dataset) as writer:
        store.check_covers(ids)
        for image_id, labels in map_jobs(job, store, dataset, ids, settings.label_crf.workers, "affinity_labels"):
            writer.write(image_id, labels)
    report = writer.report()
    write_json(METRICS, report)
    typer.echo(f"affinity labels: mIoU {report['miou']:.4f} on the {report['coverage']:.1%} of pixels labelled")


app = single_command(affinity_labels)

if __name__ == "__main__":
    app()
