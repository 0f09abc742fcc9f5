"""Stage `affinity_labels`: confident fg/bg/ignore label maps from the refined CAMs (PSA or IRN).

Sharded like export_cams: dist.nproc > 1 runs the ranks under torchrun, `--shard i/n` one shard, `--merge n`
merges them; the merged folder and scores equal one process's.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages._run import MERGE_OPTION, SHARD_OPTION, run_label_stage, skipped
from stages.artifacts import AFFINITY_LABEL_METRICS, AFFINITY_LABELS, MANIFEST, PARAMS_FILE, REFINED_STORE
from wsss_core.affinity.label_jobs import affinity_label_job, map_jobs
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.metrics import describe_miou


@reports_errors
def affinity_labels(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
                    shard: str = SHARD_OPTION, merge: int = MERGE_OPTION) -> None:
    """Write labels/affinity/<id>.png (0 bg, classes, 255 unsure) and their precision on GT."""
    params = load_params(params_file)
    if skipped("affinity_labels", params):
        return
    settings = params.affinity
    dataset = Dataset.load(MANIFEST)
    job = partial(affinity_label_job, settings=settings)
    workers = (settings.psa_label_crf if settings.label_mode == "psa" else settings.irn_label_crf).workers

    def write_labels(ids: list[str], writer: LabelDirWriter) -> None:
        with CamStore(REFINED_STORE) as store:
            store.check_covers(ids)
            for image_id, labels in map_jobs(job, store, dataset, ids, workers, "affinity_labels"):
                writer.write(image_id, labels)

    run_label_stage("stages.affinity_labels", params, shard, merge, dataset, dataset.ids("train"), AFFINITY_LABELS,
                    AFFINITY_LABEL_METRICS, write_labels,
                    lambda report: f"affinity labels: {describe_miou(report)} (of the pixels labelled)")


app = single_command(affinity_labels)

if __name__ == "__main__":
    app()
