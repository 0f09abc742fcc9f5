"""Stage `dcrf`: dense CRF of the random-walk scores, in a process pool; labels/crf/*.png.

Sharded like export_cams: dist.nproc > 1 runs the ranks under torchrun, `--shard i/n` one shard, `--merge n`
merges them; the merged folder and scores equal one process's.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages._run import MERGE_OPTION, SHARD_OPTION, run_label_stage, skipped
from stages.artifacts import CRF_LABELS, CRF_METRICS, MANIFEST, PARAMS_FILE, RW_STORE
from wsss_core.affinity.label_jobs import crf_job, map_jobs
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.metrics import describe_miou


@reports_errors
def dcrf(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
         shard: str = SHARD_OPTION, merge: int = MERGE_OPTION) -> None:
    """CRF-refine cams/cams_rw.h5 into labels/crf/<id>.png; metrics/crf.json."""
    params = load_params(params_file)
    if skipped("dcrf", params):
        return
    dataset = Dataset.load(MANIFEST)
    job = partial(crf_job, settings=params.crf)

    def write_labels(ids: list[str], writer: LabelDirWriter) -> None:
        with CamStore(RW_STORE) as store:
            store.check_covers(ids)
            for image_id, labels in map_jobs(job, store, dataset, ids, params.crf.workers, "dcrf", background=True):
                writer.write(image_id, labels)

    run_label_stage("stages.dcrf", params, shard, merge, dataset, dataset.ids("train"), CRF_LABELS, CRF_METRICS,
                    write_labels, lambda report: f"dense CRF: {describe_miou(report)} -> {CRF_LABELS}")


app = single_command(dcrf)

if __name__ == "__main__":
    app()
