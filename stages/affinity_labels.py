"""Stage `affinity_labels`: confident fg/bg/ignore label maps from the refined CAMs (PSA or IRN)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command, skipped
from stages.artifacts import AFFINITY_LABEL_METRICS, AFFINITY_LABELS, MANIFEST, PARAMS_FILE, REFINED_STORE
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.io import write_json
from wsss_core.metrics import describe_miou
from wsss_core.refine.label_jobs import affinity_label_job, map_jobs


@reports_errors
def affinity_labels(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write labels/affinity/<id>.png (0 bg, classes, 255 unsure) and their precision on GT."""
    params = load_params(params_file)
    if skipped("affinity_labels", params):
        return
    settings = params.affinity
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    job = partial(affinity_label_job, settings=settings)
    workers = (settings.psa_label_crf if settings.label_mode == "psa" else settings.irn_label_crf).workers
    with CamStore(REFINED_STORE) as store, LabelDirWriter(AFFINITY_LABELS, dataset) as writer:
        store.check_covers(ids)
        for image_id, labels in map_jobs(job, store, dataset, ids, workers, "affinity_labels"):
            writer.write(image_id, labels)
    report = writer.report()
    write_json(AFFINITY_LABEL_METRICS, report)
    typer.echo(f"affinity labels: {describe_miou(report)} (of the pixels labelled)")


app = single_command(affinity_labels)

if __name__ == "__main__":
    app()
