"""Stage `dcrf`: dense CRF of the random-walk scores, in a process pool; labels/crf/*.png."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command, skipped
from stages.artifacts import CRF_LABELS, CRF_METRICS, MANIFEST, PARAMS_FILE, RW_STORE
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.io import write_json
from wsss_core.metrics import describe_miou
from wsss_core.refine.label_jobs import crf_job, map_jobs


@reports_errors
def dcrf(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """CRF-refine cams/cams_rw.h5 into labels/crf/<id>.png; metrics/crf.json."""
    params = load_params(params_file)
    if skipped("dcrf", params):
        return
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    job = partial(crf_job, settings=params.crf)
    with CamStore(RW_STORE) as store, LabelDirWriter(CRF_LABELS, dataset) as writer:
        store.check_covers(ids)
        for image_id, labels in map_jobs(job, store, dataset, ids, params.crf.workers, "dcrf", background=True):
            writer.write(image_id, labels)
    report = writer.report()
    write_json(CRF_METRICS, report)
    typer.echo(f"dense CRF: {describe_miou(report)} -> {CRF_LABELS}")


app = single_command(dcrf)

if __name__ == "__main__":
    app()
