"""Stage `eval_cams`: CAM seed mIoU on the train split at the configured and the best threshold."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command
from stages.export_cams import CAM_STORE
from wsss_core.cams.calibration import part_body_activation
from wsss_core.cams.evaluate import cam_metrics
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.data.synthetic import SyntheticSpec
from wsss_core.io import write_json

METRICS = Path("metrics/cam.json")
SWEEP_PLOT = Path("plots/cam_sweep.json")


@reports_errors
def eval_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Score cams/cams.h5 against ground truth; writes metrics/cam.json and the threshold sweep plot."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    with CamStore(CAM_STORE) as store:
        store.check_covers(ids)
        report = cam_metrics(store, dataset, ids, params.cams.bg_threshold, params.cams.sweep)
        if params.data.name == "synthetic":  # how partial the CAMs are: the point of the synthetic set
            spec = SyntheticSpec(seed=params.data.seed, **params.data.synthetic.model_dump())
            report["synthetic_activation"] = part_body_activation(store, spec, ids)
    write_json(METRICS, report)
    if "synthetic_activation" in report:
        typer.echo("mean CAM on parts / bodies / background: {part_mean:.3f} / {body_mean:.3f} / "
                   "{background_mean:.3f}".format(**report["synthetic_activation"]))
    sweep = report["sweep"]
    write_json(SWEEP_PLOT, {"sweep": [{"bg_threshold": t, "miou": m} for t, m in zip(sweep["thresholds"], sweep["miou"])]})
    typer.echo(f"CAM mIoU {report['miou']:.4f} at threshold {report['bg_threshold']}; "
               f"best {sweep['best_miou']:.4f} at {sweep['best_threshold']} (tuned on GT)")


app = single_command(eval_cams)

if __name__ == "__main__":
    app()
