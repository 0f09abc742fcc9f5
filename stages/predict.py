"""`wsss predict`: segment new images with a trained checkpoint; palette PNGs and overlays."""
from __future__ import annotations

from pathlib import Path

import typer
from PIL import Image

from stages.train_seg import CHECKPOINT
from stages._common import reports_errors, single_command
from wsss_core.checkpoint import read_checkpoint
from wsss_core.data.dataset import read_rgb
from wsss_core.data.palette import write_label_png
from wsss_core.refine.crf import CrfSettings
from wsss_core.seg.infer import list_images, segment, segmenter_from_checkpoint
from wsss_core.training import resolve_device
from wsss_core.viz import label_overlay


@reports_errors
def predict(
    images: list[Path] = typer.Argument(..., help="image files and/or folders of images"),
    model: Path = typer.Option(CHECKPOINT, "--model", help="segmentation checkpoint written by train_seg"),
    out: Path = typer.Option(Path("predictions"), "--out", help="folder for <name>.png and <name>_overlay.jpg"),
    scales: list[float] = typer.Option([1.0], "--scale", help="inference scale; repeat for multi-scale"),
    flip: bool = typer.Option(False, "--flip", help="also average the mirrored image"),
    crf: bool = typer.Option(False, "--crf", help="refine with a dense CRF (PSA's default settings)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Write a VOC-palette label PNG and an overlay for every image; prints the class names found."""
    paths = list_images(images)
    network, class_names = segmenter_from_checkpoint(read_checkpoint(model), model)
    torch_device = resolve_device(device)
    network.to(torch_device)
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = read_rgb(path)
        labels = segment(network, image, torch_device, scales, flip, CrfSettings() if crf else None)
        write_label_png(out / f"{path.stem}.png", labels)
        Image.fromarray(label_overlay(image, labels)).save(out / f"{path.stem}_overlay.jpg", quality=90)
        found = [class_names[k] for k in sorted(set(labels.ravel().tolist()) - {0})]
        typer.echo(f"{path}: {', '.join(found) or 'background only'}")
    typer.echo(f"wrote {2 * len(paths)} files to {out}")


app = single_command(predict)

if __name__ == "__main__":
    app()
