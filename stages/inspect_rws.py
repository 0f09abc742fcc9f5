"""`wsss rws ls` and `wsss rws show ID`: why RWS chose its weak slices (the rws/ folder train_seg writes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from stages._common import reports_errors
from stages.artifacts import MANIFEST, RWS_REPORT
from wsss_core.data.dataset import Dataset
from wsss_core.errors import DataError
from wsss_core.io import save_image
from wsss_core.viz import captioned, heatmap_overlay, hstack, slice_boxes

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Inspect RWS's thresholds, weak slices and heatmaps.")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found (train_seg writes it when seg.rws.enabled)")
    return json.loads(path.read_text())


@app.command("ls")
@reports_errors
def list_rws(folder: Path = typer.Option(RWS_REPORT, "--rws", help="the rws/ folder train_seg wrote")) -> None:
    """Print each round's T, window and weak-slice counts, and the images whose heatmaps were kept."""
    report = _read_json(folder / "report.json")
    if not report["enabled"]:
        typer.echo(f"{folder}: RWS was off ({report['skipped']}); training took {report['train_seconds']:.0f} s")
        return
    for number, found in enumerate(report["rounds"], 1):
        typer.echo(f"round {number}: T {found['threshold']:.3f}, {found['windows']} windows, "
                   f"{found['weak_slices']} weak slices in {found['images_with_weak_slices']} images")
    with np.load(folder / "heatmaps.npz") as heatmaps:
        typer.echo("heatmaps: " + " ".join(sorted({key.rsplit("/", 1)[0] for key in heatmaps.files})))


@app.command("show")
@reports_errors
def show_rws(
    image_id: str = typer.Argument(..., help="an image id with kept heatmaps (`wsss rws ls` lists them)"),
    folder: Path = typer.Option(RWS_REPORT, "--rws", help="the rws/ folder train_seg wrote"),
    manifest: Path = typer.Option(MANIFEST, "--dataset", help="dataset manifest written by prepare"),
    out: Path = typer.Option(None, "--out", help="PNG to write (default: rws_<id>.png)"),
) -> None:
    """Write a PNG: the image with its weak slices (class, mean attention) | the last stage's heatmap |
    the cross-layer maximum Gamma | the blend strength summed over the layers."""
    slices = [s for s in _read_json(folder / "slices.json")["slices"] if s["image"] == image_id]
    with np.load(folder / "heatmaps.npz") as heatmaps:
        if f"{image_id}/attention" not in heatmaps.files:
            raise DataError(f"{folder}/heatmaps.npz: no heatmaps of {image_id!r} (see `wsss rws ls`)")
        attention = heatmaps[f"{image_id}/attention"].astype(np.float32)  # [l, H, W]
        beta = heatmaps[f"{image_id}/beta"].astype(np.float32)
    image = Dataset.load(manifest).read_image(image_id)
    boxes = [(tuple(s["box"]), f"{s['class']}:{s['attention']:.2f}") for s in slices]
    tiles = [captioned(slice_boxes(image, boxes), f"{image_id}: {len(boxes)} weak slices"),
             captioned(heatmap_overlay(image, attention[-1]), "last stage"),
             captioned(heatmap_overlay(image, attention.max(0)), "max over stages"),
             captioned(heatmap_overlay(image, np.clip(beta.sum(0), 0, 1)), "blend strength")]
    out = out or Path(f"rws_{image_id}.png")
    save_image(out, hstack(tiles))
    typer.echo(f"wrote {out}")
