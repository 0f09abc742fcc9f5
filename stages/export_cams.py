"""Stage `export_cams`: multi-scale + flip CAMs of the train split into cams/cams.h5 (with the method's raw maps)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import CAM_STORE, CLS_CHECKPOINT, EXPORT_SPEED, MANIFEST, PARAMS_FILE
from wsss_core.cams.infer import export_cams as export
from wsss_core.data.dataset import Dataset
from wsss_core.io import write_json
from wsss_core.methods import get_method
from wsss_core.training import place, resolve_device


@reports_errors
def export_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Export the train split's CAMs (ground-truth classes only, max-normalised) to cams/cams.h5."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    method = get_method(params)
    device = resolve_device(params.device)
    model = place(method.load_classifier(CLS_CHECKPOINT, params.cls, dataset.num_classes), device)
    attrs = {
        "method": params.method,
        "scales": params.cams.scales,
        "flip": params.cams.flip,
        "stride": model.cam_stride,
        "class_names": dataset.class_names,
        "params": {"method": params.method, **method.checkpoint_params(params.cls), "cams": params.cams.model_dump()},
    }
    ids = dataset.ids("train")
    rate = export(partial(method.cam_maps, model), dataset, ids, CAM_STORE, attrs, mean=model.mean, std=model.std,
                  scales=params.cams.scales, flip=params.cams.flip, batch_size=params.cams.batch_size, device=device,
                  num_workers=params.cls.num_workers, raw_maps=partial(method.raw_maps, model),
                  segment=method.segmenter(model))
    size = CAM_STORE.stat().st_size
    write_json(EXPORT_SPEED, {"images_per_second": rate, "bytes_per_image": size / len(ids), "images": len(ids)})
    typer.echo(f"wrote {CAM_STORE}: {len(ids)} images, {rate:.2f} img/s, {size / len(ids) / 1024:.1f} KiB/img")


app = single_command(export_cams)

if __name__ == "__main__":
    app()
