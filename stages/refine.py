"""Stage `refine`: the method's CAM refinement (pass-through for methods without one), scored like the CAMs."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import CAM_STORE, MANIFEST, PARAMS_FILE, REFINED_METRICS, REFINED_STORE
from wsss_core.cams.evaluate import describe_report, score_cam_store
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.io import write_json
from wsss_core.methods import get_method


@reports_errors
def refine(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write cams/cams_refined.h5 from cams/cams.h5 with the method's refinement; metrics/cam_refined.json."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    method = get_method(params)
    with CamStore(CAM_STORE) as store:  # a clear error if the store is missing, unreadable or incomplete
        store.check_covers(ids)
    method.refine_cams(CAM_STORE, REFINED_STORE, ids)
    report = score_cam_store(REFINED_STORE, dataset, params.cams, params.data, classifier_store=CAM_STORE,
                             reference=CAM_STORE)
    with CamStore(CAM_STORE) as store:
        statistics = method.attention_statistics(store, dataset, ids)
    if statistics:
        report["attention"] = statistics
    write_json(REFINED_METRICS, report)
    typer.echo(describe_report("refined CAM" if method.refines else "refined CAM (pass-through)", report))


app = single_command(refine)

if __name__ == "__main__":
    app()
