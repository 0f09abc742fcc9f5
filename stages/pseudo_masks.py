"""Stage `pseudo_masks`: the final training labels for segmentation (VOC palette PNGs)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import (CAM_STORE, CRF_LABELS, MANIFEST, PARAMS_FILE, PSEUDO_MASKS, PSEUDO_METRICS, REFINED_STORE,
                              RW_STORE)
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.io import write_json
from wsss_core.metrics import describe_miou
from wsss_core.refine.pseudo import PseudoMaskSources


@reports_errors
def pseudo_masks(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write labels/pseudo/<id>.png from the configured source; metrics/pseudo.json on the train split."""
    params = load_params(params_file)
    settings = params.pseudo
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    with PseudoMaskSources(settings, ids, refined=REFINED_STORE, walked=RW_STORE, crf_dir=CRF_LABELS,
                           exported=CAM_STORE, seed_bg_threshold=params.cams.seed_bg_threshold) as sources, \
            LabelDirWriter(PSEUDO_MASKS, dataset) as writer:
        for image_id in ids:
            writer.write(image_id, sources.labels(image_id))
    report = writer.report()
    write_json(PSEUDO_METRICS, report)
    typer.echo(f"pseudo masks ({settings.source}): {describe_miou(report)}")


app = single_command(pseudo_masks)

if __name__ == "__main__":
    app()
