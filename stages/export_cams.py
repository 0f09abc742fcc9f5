"""Stage `export_cams`: multi-scale + flip CAMs of the train split into cams/cams.h5 (with the method's raw maps).

Sharded: with dist.nproc > 1 the stage runs under torchrun, each rank exports whole size batches of its
shard and rank 0 merges the shards into cams/cams.h5. Without torchrun, `--shard i/n` exports one shard
(e.g. one task of a cluster's job array) and `--merge n` merges the n shards afterwards.
"""
from __future__ import annotations

from pathlib import Path

import torch
import typer

from stages._common import load_params, reports_errors, single_command
from stages._run import MERGE_OPTION, SHARD_OPTION, run_sharded
from stages.artifacts import CAM_STORE, CLS_CHECKPOINT, EXPORT_SPEED, MANIFEST, PARAMS_FILE
from wsss_core.cams.infer import export_cams as write_cam_store
from wsss_core.cams.store import merge_stores
from wsss_core.data.dataset import Dataset
from wsss_core.io import remove_path, shard_path, shard_paths, write_json
from wsss_core.methods import get_method
from wsss_core.training import place


@reports_errors
def export_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
                shard: str = SHARD_OPTION, merge: int = MERGE_OPTION) -> None:
    """Export the train split's CAMs (ground-truth classes only, max-normalised) to cams/cams.h5."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")

    def work(index: int, count: int, device: torch.device) -> None:
        method = get_method(params)
        model = place(method.load_classifier(CLS_CHECKPOINT, params.cls, dataset.num_classes), device)
        attrs = {
            "method": params.method,
            "scales": params.cams.scales,
            "flip": params.cams.flip,
            "stride": model.cam_stride,
            "class_names": dataset.class_names,
            # num_workers is a speed knob, left out so that the store's bytes do not depend on it
            "params": {"method": params.method, **method.checkpoint_params(params.cls),
                       "cams": params.cams.model_dump(exclude={"num_workers"})},
        }
        out = CAM_STORE if count == 1 else shard_path(CAM_STORE, index, count)
        rate = write_cam_store(method.cam_hooks(model), dataset, ids, out, attrs, params.cams, device=device,
                               shard=(index, count))
        if count == 1:
            write_speed(rate, len(ids))

    def combine(count: int, seconds: float | None) -> None:
        parts = shard_paths(CAM_STORE, count)
        merge_stores(parts, CAM_STORE, ids)
        for part in parts:
            remove_path(part)
        write_speed(len(ids) / seconds if seconds else None, len(ids))

    run_sharded("stages.export_cams", params, shard, merge, work, combine)


def write_speed(rate: float | None, images: int) -> None:
    """Write metrics/export_speed.json (rate None: the shards ran apart, their total rate is unknown)."""
    size = CAM_STORE.stat().st_size
    write_json(EXPORT_SPEED, {"images_per_second": rate, "bytes_per_image": size / images, "images": images})
    speed = f"{rate:.2f} img/s, " if rate is not None else ""
    typer.echo(f"wrote {CAM_STORE}: {images} images, {speed}{size / images / 1024:.1f} KiB/img")


app = single_command(export_cams)

if __name__ == "__main__":
    app()
