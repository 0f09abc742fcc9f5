"""Stage `pseudo_masks`: the final training labels for segmentation (VOC palette PNGs).

Sharded like export_cams: dist.nproc > 1 runs the ranks under torchrun, `--shard i/n` one shard, `--merge n`
merges them; the merged folder and scores equal one process's.
"""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages._run import MERGE_OPTION, SHARD_OPTION, run_label_stage
from stages.artifacts import (CAM_STORE, CRF_LABELS, MANIFEST, PARAMS_FILE, PSEUDO_MASKS, PSEUDO_METRICS, REFINED_STORE,
                              RW_STORE)
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.metrics import describe_miou
from wsss_core.pseudo import PseudoMaskSources


@reports_errors
def pseudo_masks(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
                 shard: str = SHARD_OPTION, merge: int = MERGE_OPTION) -> None:
    """Write labels/pseudo/<id>.png from the configured source; metrics/pseudo.json on the train split."""
    params = load_params(params_file)
    settings = params.pseudo
    dataset = Dataset.load(MANIFEST)

    def write_labels(ids: list[str], writer: LabelDirWriter) -> None:
        with PseudoMaskSources(settings, ids, refined=REFINED_STORE, walked=RW_STORE, crf_dir=CRF_LABELS,
                               exported=CAM_STORE, seed_bg_threshold=params.cams.seed_bg_threshold) as sources:
            for image_id in ids:
                writer.write(image_id, sources.labels(image_id))

    run_label_stage("stages.pseudo_masks", params, shard, merge, dataset, dataset.ids("train"), PSEUDO_MASKS,
                    PSEUDO_METRICS, write_labels,
                    lambda report: f"pseudo masks ({settings.source}): {describe_miou(report)}")


app = single_command(pseudo_masks)

if __name__ == "__main__":
    app()
