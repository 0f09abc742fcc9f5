"""Stage `export_cams`: multi-scale + flip CAMs of the train split into cams/cams.h5 (with the method's raw maps).

Sharded: with dist.nproc > 1 the stage runs under torchrun, each rank exports whole size batches of its
shard and rank 0 merges the shards into cams/cams.h5. Without torchrun, `--shard i/n` exports one shard
(e.g. one task of a cluster's job array) and `--merge n` merges the n shards afterwards.
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import typer

from stages._common import load_params, ran_under_torchrun, reports_errors, single_command
from stages.artifacts import CAM_STORE, CLS_CHECKPOINT, EXPORT_SPEED, MANIFEST, PARAMS_FILE
from wsss_core.cams.infer import export_cams as export
from wsss_core.cams.store import merge_stores, shard_path
from wsss_core.data.dataset import Dataset
from wsss_core.distributed import barrier, parse_shard, process_group, world
from wsss_core.errors import ParamsError
from wsss_core.io import remove_path, write_json
from wsss_core.methods import get_method
from wsss_core.training import place, resolve_device


@reports_errors
def export_cams(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read"),
                shard: str = typer.Option("", "--shard", help="i/n: export shard i of n only, to "
                                          "cams/cams.h5.shard-i-of-n (merge them with --merge n)"),
                merge: int = typer.Option(0, "--merge", help="n: merge the n shards of --shard into cams/cams.h5")
                ) -> None:
    """Export the train split's CAMs (ground-truth classes only, max-normalised) to cams/cams.h5."""
    params = load_params(params_file)
    dataset = Dataset.load(MANIFEST)
    ids = dataset.ids("train")
    if merge:
        merge_shards(merge, ids, rate=None)
        return
    if not shard and ran_under_torchrun("stages.export_cams", params.dist.nproc):
        return
    method = get_method(params)
    with process_group(resolve_device(params.device), params.dist.backend) as device:
        rank, size = world()
        if shard and size > 1:
            raise ParamsError("--shard exports one shard in one process; under torchrun the ranks are the shards")
        index, count = parse_shard(shard) if shard else (rank, size)
        model = place(method.load_classifier(CLS_CHECKPOINT, params.cls, dataset.num_classes), device)
        attrs = {
            "method": params.method,
            "scales": params.cams.scales,
            "flip": params.cams.flip,
            "stride": model.cam_stride,
            "class_names": dataset.class_names,
            "params": {"method": params.method, **method.checkpoint_params(params.cls),
                       "cams": params.cams.model_dump()},
        }
        started = time.perf_counter()
        rate = export(partial(method.cam_maps, model), dataset, ids,
                      CAM_STORE if count == 1 else shard_path(CAM_STORE, index, count), attrs, mean=model.mean,
                      std=model.std, scales=params.cams.scales, flip=params.cams.flip,
                      batch_size=params.cams.batch_size, device=device, num_workers=params.cls.num_workers,
                      raw_maps=partial(method.raw_maps, model), segment=method.segmenter(model), shard=(index, count))
        barrier()
        if count == 1:
            write_speed(rate, len(ids))
        elif size > 1 and rank == 0:
            merge_shards(count, ids, rate=len(ids) / (time.perf_counter() - started))
        elif shard:
            typer.echo(f"wrote shard {index} of {count}; once all are written: "
                       f"python -m stages.export_cams --merge {count}")


def merge_shards(count: int, ids: list[str], rate: float | None) -> None:
    """Merge the `count` shard stores into cams/cams.h5, remove them and write the export speed."""
    if count < 1:
        raise ParamsError(f"--merge {count}: give the number of shards (at least 1)")
    parts = [shard_path(CAM_STORE, index, count) for index in range(count)]
    merge_stores(parts, CAM_STORE, ids)
    for part in parts:
        remove_path(part)
    write_speed(rate, len(ids))


def write_speed(rate: float | None, images: int) -> None:
    """Write metrics/export_speed.json (rate None: the shards ran apart, their total rate is unknown)."""
    size = CAM_STORE.stat().st_size
    write_json(EXPORT_SPEED, {"images_per_second": rate, "bytes_per_image": size / images, "images": images})
    speed = f"{rate:.2f} img/s, " if rate is not None else ""
    typer.echo(f"wrote {CAM_STORE}: {images} images, {speed}{size / images / 1024:.1f} KiB/img")


app = single_command(export_cams)

if __name__ == "__main__":
    app()
