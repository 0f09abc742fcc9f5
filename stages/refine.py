"""Stage `refine`: the method's attention refinement of the CAM store (pass-through for `cam`)."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command
from stages.export_cams import CAM_STORE
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.methods import get_method

REFINED_STORE = Path("cams/cams_refined.h5")


@reports_errors
def refine(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Write cams/cams_refined.h5 from cams/cams.h5 with the method's refinement."""
    params = load_params(params_file)
    with CamStore(CAM_STORE) as store:  # a clear error if the store is missing, unreadable or incomplete
        store.check_covers(Dataset.load(MANIFEST).ids("train"))
    get_method(params.method).refine_cams(CAM_STORE, REFINED_STORE)
    typer.echo(f"wrote {REFINED_STORE}")


app = single_command(refine)

if __name__ == "__main__":
    app()
