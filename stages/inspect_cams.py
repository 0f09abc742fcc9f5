"""`wsss cams ls` and `wsss cams show ID`: look inside a CAM store."""
from __future__ import annotations

from pathlib import Path

import typer

from stages._common import reports_errors
from stages.artifacts import CAM_STORE, MANIFEST
from wsss_core.cams.store import CamStore
from wsss_core.data.dataset import Dataset
from wsss_core.errors import DataError
from wsss_core.io import save_image
from wsss_core.viz import cam_panel, vstack

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Inspect a CAM store (HDF5).")


@app.command("ls")
@reports_errors
def list_cams(store_path: Path = typer.Option(CAM_STORE, "--store", help="CAM store to read")) -> None:
    """List the stored image ids with their classes and CAM size."""
    with CamStore(store_path) as store:
        names = store.class_names
        raw = ", ".join(store.raw_names) or "none"
        ids = store.ids()
        class_maps = ", ".join(store.map_names(ids[0])) if ids else "none"
        typer.echo(f"{store_path}: method={store.attr('method')} scales={store.attr('scales')} "
                   f"stride={store.attr('stride')} images={len(ids)} class maps: {class_maps} raw maps: {raw}")
        for image_id in ids:
            cam, keys = store.read(image_id)
            classes = ",".join(names[k] for k in keys)
            typer.echo(f"{image_id}\t{cam.shape[1]}x{cam.shape[2]}\t{classes}")


@app.command("show")
@reports_errors
def show_cams(
    image_ids: list[str] = typer.Argument(..., help="image ids to draw (one row each)"),
    store_path: Path = typer.Option(CAM_STORE, "--store", help="CAM store to read"),
    manifest: Path = typer.Option(MANIFEST, "--dataset", help="dataset manifest written by prepare"),
    out: Path = typer.Option(None, "--out", help="PNG to write (default: cams_<first id>.png)"),
    maps: list[str] = typer.Option(["cam"], "--map", help="class map(s) to draw, e.g. cam_sa1 (a method's "
                                   "per-layer CAMs; `wsss cams ls` lists them); repeat for several rows per id"),
) -> None:
    """Write a PNG: image | each class's map overlay | ground truth, one row per id and map."""
    dataset = Dataset.load(manifest)
    with CamStore(store_path) as store:
        rows = []
        for image_id in image_ids:
            if image_id not in store:
                raise DataError(f"{store_path}: no image {image_id!r} (see `wsss cams ls`)")
            for name in maps:
                cam, keys = store.read(image_id, name)
                rows.append(cam_panel(dataset.read_image(image_id), cam, keys, store.class_names,
                                      dataset.read_mask(image_id) if dataset.has_mask(image_id) else None,
                                      title=f"{image_id} {name}"))
    out = out or Path(f"cams_{image_ids[0]}.png")
    save_image(out, vstack(rows))
    typer.echo(f"wrote {out}")
