"""Stage `eval_cams`: CAM seed mIoU on the train split at the configured and the best threshold."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import CAM_METRICS, CAM_STORE, CAM_SWEEP_PLOT, MANIFEST, PARAMS_FILE
from wsss_core.cams.evaluate import describe_report, score_cam_store
from wsss_core.data.dataset import Dataset
from wsss_core.io import write_json


@reports_errors
def eval_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Score cams/cams.h5 against ground truth; writes metrics/cam.json and the threshold sweep plot."""
    params = load_params(params_file)
    report = score_cam_store(CAM_STORE, Dataset.load(MANIFEST), params.cams, params.data)
    write_json(CAM_METRICS, report)
    sweep = report["sweep"]
    write_json(CAM_SWEEP_PLOT, {"sweep": [{"bg_threshold": t, "miou": m, "foreground_share": share}
                                          for t, m, share in zip(sweep.get("thresholds", []), sweep.get("miou", []),
                                                                 sweep.get("foreground_share", []))]})
    typer.echo(describe_report("CAM", report))


app = single_command(eval_cams)

if __name__ == "__main__":
    app()
