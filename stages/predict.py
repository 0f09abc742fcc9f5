"""`wsss predict`: segment new images with a trained checkpoint; palette PNGs and overlays."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from stages._common import reports_errors, single_command
from stages.artifacts import SEG_CHECKPOINT
from wsss_core.checkpoint import read_checkpoint
from wsss_core.data.images import DEFAULT_MAX_PIXELS, read_rgb
from wsss_core.data.palette import write_label_png
from wsss_core.errors import DataError, ParamsError
from wsss_core.io import atomic_path, save_image
from wsss_core.config import CrfParams
from wsss_core.seg.infer import list_images, segment, segmenter_from_checkpoint
from wsss_core.training import resolve_device
from wsss_core.viz import label_overlay


def _writable_folder(out: Path) -> None:
    """Create `out` if needed; a file in its place or a folder we cannot write to is a ParamsError."""
    if out.exists() and not out.is_dir():
        raise ParamsError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParamsError(f"--out {out}: cannot create the folder ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ParamsError(f"--out {out}: the folder is not writable")


@reports_errors
def predict(
    images: list[Path] = typer.Argument(..., help="image files and/or folders of images"),
    model: Path = typer.Option(SEG_CHECKPOINT, "--model", help="segmentation checkpoint written by train_seg"),
    out: Path = typer.Option(Path("predictions"), "--out", help="folder for <name>.png and <name>_overlay.jpg"),
    scales: list[float] = typer.Option([1.0], "--scale", help="inference scale; repeat for multi-scale"),
    flip: bool = typer.Option(False, "--flip", help="also average the mirrored image"),
    crf: bool = typer.Option(False, "--crf", help="refine with a dense CRF (PSA's default settings)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="refuse images with more pixels"),
) -> None:
    """Write a VOC-palette label PNG and an overlay for every image; prints the class names found.

    A bad image is reported and skipped; the command exits non-zero at the end if any was.
    """
    bad_scales = [scale for scale in scales if not scale > 0]
    if bad_scales:
        raise ParamsError(f"--scale must be positive, got {bad_scales[0]}")
    if max_pixels < 1:
        raise ParamsError(f"--max-pixels must be positive, got {max_pixels}")
    torch_device = resolve_device(device)
    paths = list_images(images)
    network, class_names = segmenter_from_checkpoint(read_checkpoint(model), model)
    _writable_folder(out)
    network.to(torch_device)
    failed = []
    for path in paths:
        try:
            image = read_rgb(path, max_pixels)
        except DataError as err:
            typer.secho(f"skipped: {err}", err=True, fg=typer.colors.RED)
            failed.append(path)
            continue
        labels = segment(network, image, torch_device, scales, flip, CrfParams() if crf else None)
        with atomic_path(out / f"{path.stem}.png") as temporary:
            write_label_png(temporary, labels)
        save_image(out / f"{path.stem}_overlay.jpg", label_overlay(image, labels))
        found = [class_names[k] for k in sorted(set(labels.ravel().tolist()) - {0})]
        typer.echo(f"{path}: {', '.join(found) or 'background only'}")
    typer.echo(f"wrote {2 * (len(paths) - len(failed))} files to {out}")
    if failed:
        raise DataError(f"{len(failed)} of {len(paths)} images could not be read (see above), e.g. {failed[0]}")


app = single_command(predict)

if __name__ == "__main__":
    app()
