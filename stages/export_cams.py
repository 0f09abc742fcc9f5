"""Stage `export_cams`: multi-scale + flip CAMs of the train split into cams/cams.h5."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import MANIFEST, PARAMS_FILE, load_params, reports_errors, single_command
from stages.train_cls import CHECKPOINT
from wsss_core.cams.infer import export_cams as export
from wsss_core.checkpoint import load_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.methods import get_method
from wsss_core.training import resolve_device
from wsss_core.io import write_json

CAM_STORE = Path("cams/cams.h5")
SPEED_FILE = Path("metrics/export_speed.json")
MODEL_KEYS = ("backbone", "output_stride")


@reports_errors
def export_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Export the train split's CAMs (ground-truth classes only, max-normalised) to cams/cams.h5."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    method = get_method(params.method)
    checkpoint = load_checkpoint(CHECKPOINT, params.method, {k: getattr(params.cls, k) for k in MODEL_KEYS}, "cls")
    model = method.build_classifier(params.cls.model_copy(update={"pretrained": ""}), dataset.num_classes)
    model.load_state_dict(checkpoint["model"])
    attrs = {
        "method": params.method,
        "scales": params.cams.scales,
        "flip": params.cams.flip,
        "stride": model.backbone.output_stride,
        "class_names": dataset.class_names,
        "params": {"method": params.method, "cls": params.cls.model_dump(), "cams": params.cams.model_dump()},
    }
    ids = dataset.ids("train")
    rate = export(method, model, dataset, ids, CAM_STORE, attrs, params.cams.scales, params.cams.flip,
                  params.cams.batch_size, resolve_device(params.device), params.cls.num_workers)
    size = CAM_STORE.stat().st_size
    write_json(SPEED_FILE, {"images_per_second": rate, "bytes_per_image": size / len(ids), "images": len(ids)})
    typer.echo(f"wrote {CAM_STORE}: {len(ids)} images, {rate:.2f} img/s, {size / len(ids) / 1024:.1f} KiB/img")


app = single_command(export_cams)

if __name__ == "__main__":
    app()
