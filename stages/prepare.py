"""Stage `prepare`: build the dataset manifest (generating the synthetic set when selected)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer

from stages._common import load_params, reports_errors, single_command
from stages.artifacts import MANIFEST, PARAMS_FILE
from wsss_core.config import DataParams
from wsss_core.data.coco import read_coco
from wsss_core.data.dataset import Dataset
from wsss_core.data.synthetic import generate_synthetic
from wsss_core.data.tags import read_tags
from wsss_core.data.sources import VocParams
from wsss_core.data.voc import read_voc
from wsss_core.errors import ParamsError
from wsss_core.io import atomic_path


def synthetic_source(data: DataParams, staging: Path) -> Dataset:
    """Generate the synthetic set inside the staging folder and read it as a VOC tree."""
    class_names = generate_synthetic(staging / "synthetic", data.synthetic_spec())
    return read_voc(VocParams(root=str(staging / "synthetic"), val_list="ImageSets/Segmentation/val.txt"),
                    data.limits(), class_names=class_names)


def voc_source(data: DataParams, staging: Path) -> Dataset:
    return read_voc(data.voc, data.limits(), seed=data.seed)


def tags_source(data: DataParams, staging: Path) -> Dataset:
    if not data.tags.root:
        raise ParamsError("data.tags.root: give the folder holding images/ and the labels file")
    return read_tags(data.tags, data.limits(), seed=data.seed)


def coco_source(data: DataParams, staging: Path) -> Dataset:
    return read_coco(data.coco, data.limits())


SOURCES: dict[str, Callable[[DataParams, Path], Dataset]] = {
    "synthetic": synthetic_source, "voc": voc_source, "tags": tags_source, "coco": coco_source}
"""Each `data.name`'s reader, given the data section and the staging folder of data/prepared/."""


@reports_errors
def prepare(params_file: Path = typer.Option(PARAMS_FILE, "--params", help="params.yaml to read")) -> None:
    """Validate the data source, generate the synthetic set if selected, and write data/prepared/."""
    data = load_params(params_file).data
    out_dir = MANIFEST.parent
    with atomic_path(out_dir, folder=True) as staging:
        dataset = SOURCES[data.name](data, staging)
        dataset.save(staging / MANIFEST.name)
    counts = ", ".join(f"{split} {len(ids)}" for split, ids in dataset.splits.items())
    typer.echo(f"prepared {data.name}: {counts} images, {dataset.num_classes} classes -> {out_dir}")


app = single_command(prepare)

if __name__ == "__main__":
    app()
