"""Stage `dcrf`: dense CRF of the random-walk scores, in a process pool; labels/crf/*.png."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, crf_settings, load_params, reports_errors, single_command
from stages.random_walk import RW_STORE
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.refine.label_jobs import crf_job, map_jobs
from wsss_core.io import write_json

LABEL_DIR = Path("labels/crf")
METRICS = Path("metrics/crf.json")


@reports_errors
def dcrf(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """CRF-refine cams/cams_rw.h5 into labels/crf/<id>.png; metrics/crf.json."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    job = partial(crf_job, settings=crf_settings(params.crf))
    ids = dataset.ids("train")
    with CamStore(RW_STORE) as store, LabelDirWriter(LABEL_DIR, dataset) as writer:
        store.check_covers(ids)
        for image_id, labels in map_jobs(job, store, dataset, ids, params.crf.workers, "dcrf", background=True):
            writer.write(image_id, labels)
    report = writer.report()
    write_json(METRICS, report)
    typer.echo(f"dense CRF: mIoU {report['miou']:.4f} -> {LABEL_DIR}")


app = single_command(dcrf)

if __name__ == "__main__":
    app()
