"""`wsss masks show ID`: image | CAM argmax | after random walk | after CRF | pseudo mask | DeepLab | GT."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import typer

from stages._common import load_params, reports_errors
from stages.artifacts import CRF_LABELS, MANIFEST, PARAMS_FILE, PSEUDO_MASKS, REFINED_STORE, RW_STORE, SEG_CHECKPOINT
from wsss_core.cams.labels import cam_labels
from wsss_core.cams.store import CamStore
from wsss_core.checkpoint import read_checkpoint
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import read_label_dir
from wsss_core.data.palette import colorize
from wsss_core.errors import DataError
from wsss_core.io import save_image
from wsss_core.pseudo import rw_labels
from wsss_core.seg.infer import segment, segmenter_from_checkpoint
from wsss_core.viz import captioned, hstack, label_overlay, vstack

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Inspect label maps along the refinement stages.")


@app.command("show")
@reports_errors
def show_masks(
    image_ids: list[str] = typer.Argument(..., help="image ids to draw (one row each)"),
    params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml (for the CAM threshold)"),
    out: Path = typer.Option(None, "--out", help="PNG to write (default: masks_<first id>.png)"),
    model: Path = typer.Option(SEG_CHECKPOINT, "--model", help="segmentation checkpoint; its column is skipped "
                                                               "when the file does not exist"),
    labels_only: bool = typer.Option(False, "--labels-only", help="plain label colours: no photo, no GT "
                                                                  "(for pictures of data you may not publish)"),
) -> None:
    """Write a PNG: image | CAM argmax | after RW | after CRF | pseudo mask | DeepLab | GT, one row per id.

    Stages that did no work with the current params (placeholders) have no column.
    """
    threshold = load_params(params_file).cams.seed_bg_threshold
    dataset = Dataset.load(MANIFEST)
    segmenter = segmenter_from_checkpoint(read_checkpoint(model), model)[0] if model.is_file() else None
    with_crf = not (CRF_LABELS / "SKIPPED.txt").exists()
    rows = []
    with contextlib.ExitStack() as stack:
        cams = stack.enter_context(CamStore(REFINED_STORE))
        walked = stack.enter_context(CamStore(RW_STORE)) if _is_store(RW_STORE) else None
        for image_id in image_ids:
            image = dataset.read_image(image_id)
            stages = [("image", None), (f"CAM (bg {threshold})", cam_labels(*cams.read(image_id), threshold))]
            if walked is not None:
                stages.append(("random walk", rw_labels(walked, image_id)))
            if with_crf:
                stages.append(("dense CRF", read_label_dir(CRF_LABELS, image_id)))
            stages.append(("pseudo mask", read_label_dir(PSEUDO_MASKS, image_id)))
            if segmenter is not None:
                stages.append(("DeepLab", segment(segmenter, image, torch.device("cpu"))))
            if labels_only:  # the pipeline's labels alone, in label colours: no photo, no ground truth
                tiles = [captioned(colorize(labels), name) for name, labels in stages[1:]]
            else:
                if dataset.has_mask(image_id):
                    stages.append(("ground truth", dataset.read_mask(image_id)))
                tiles = [captioned(image if labels is None else label_overlay(image, labels), name)
                         for name, labels in stages]
            rows.append(hstack(tiles))
    out = out or Path(f"masks_{image_ids[0]}.png")
    save_image(out, vstack(rows))
    typer.echo(f"wrote {out}")


def _is_store(path: Path) -> bool:
    """Return True when path is a CAM store with images (not a placeholder of a stage that did no work)."""
    try:
        CamStore(path).close()
        return True
    except DataError:
        return False
