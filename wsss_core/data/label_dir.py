"""A folder of label PNGs written atomically, scored against ground truth as it is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import read_label_png, write_label_png
from wsss_core.errors import DataError
from wsss_core.io import atomic_path
from wsss_core.metrics import ConfusionMatrix, dataset_baselines, iou_report, scored_report


class LabelDirWriter:
    """`with LabelDirWriter(folder, dataset) as out: out.write(id, labels)`; then `out.report()`.

    PNGs go to `<folder>.tmp/` which replaces `folder` only when the block ends without error.
    Each written map of an image with a ground-truth mask is scored against it (GT 255 ignored) both ways:
    with the map's uncertain (255) pixels dropped (reported with the coverage), and with them counted as
    background (IRN's evaluation of its pseudo labels).
    """

    def __init__(self, folder: str | Path, dataset: Dataset):
        self.folder = Path(folder)
        self.dataset = dataset
        self.confusion = ConfusionMatrix(dataset.num_classes + 1)
        self.void_as_background = ConfusionMatrix(dataset.num_classes + 1)
        self.labelled_pixels = self.valid_pixels = self.scored_images = 0
        self.scored: list[str] = []

    def __enter__(self) -> "LabelDirWriter":
        self._atomic = atomic_path(self.folder, folder=True)  # also removes a staging folder left by a killed run
        self.staging = self._atomic.__enter__()
        return self

    def write(self, image_id: str, labels: np.ndarray) -> None:
        """Save uint8 [H, W] labels (0..K, 255) as a VOC palette PNG and score the non-255 pixels."""
        write_label_png(self.staging / f"{image_id}.png", labels)
        if not self.dataset.has_mask(image_id):
            return
        self.scored_images += 1
        self.scored.append(image_id)
        target = self.dataset.read_mask(image_id)
        labelled = labels != 255
        self.confusion.update(np.where(labelled, labels, 0), np.where(labelled, target, 255))
        self.void_as_background.update(np.where(labelled, labels, 0), target)
        self.labelled_pixels += int((labelled & (target != 255)).sum())
        self.valid_pixels += int((target != 255).sum())

    def report(self) -> dict:
        """Return {'miou', 'per_class', 'scored_images', 'coverage', 'baselines', 'void_as_background': {'miou',
        'per_class'}}.

        miou/per_class: IoU over the labelled (non-255) pixels, whose share of the valid GT pixels is
        coverage (in [0, 1]); baselines: the all-background and all-foreground mIoU of the scored images
        (metrics.dataset_baselines); void_as_background: IoU with the unlabelled pixels predicted as background.
        Without any mask: miou None and the reason (metrics.scored_report).
        """
        report = scored_report(self.confusion.matrix, self.dataset.class_names, self.scored_images)
        if not self.scored_images:
            return report
        return {**report, "coverage": self.labelled_pixels / max(self.valid_pixels, 1),
                "baselines": dataset_baselines(self.dataset, self.scored),
                "void_as_background": iou_report(self.void_as_background.matrix, self.dataset.class_names)}

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._atomic.__exit__(exc_type, exc, traceback)


def read_label_dir(folder: str | Path, image_id: str) -> np.ndarray:
    """Return the uint8 [H, W] label map of image_id from a folder written by LabelDirWriter."""
    return read_label_png(Path(folder) / f"{image_id}.png")


def check_label_dir(folder: str | Path, ids: list[str], stage: str) -> None:
    """Raise a DataError unless `folder` holds a label PNG for every id (written by `stage`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: label folder not found (run the {stage} stage first)")
    missing = [image_id for image_id in ids if not (folder / f"{image_id}.png").is_file()]
    if missing:
        raise DataError(f"{folder}: {len(missing)} of the {len(ids)} train images have no label map "
                        f"(e.g. {missing[0]!r}); re-run the {stage} stage")


def merge_label_dirs(parts: list[Path], writer: LabelDirWriter, ids: list[str]) -> None:
    """Write each of `ids`, in order, into writer from the one part folder that holds it.

    The merged folder and its scores are then those of one pass over `ids` (the PNGs are the same label maps,
    scored in the same order). A missing part, or an id in no part or in two, is a DataError; the parts are
    left in place.
    """
    owner: dict[str, Path] = {}
    for part in parts:
        if not Path(part).is_dir():
            raise DataError(f"{part}: shard folder not found (run every shard before merging)")
        for file in Path(part).glob("*.png"):
            if file.stem in owner:
                raise DataError(f"{file}: image {file.stem!r} is also in {owner[file.stem]}")
            owner[file.stem] = Path(part)
    missing, foreign = sorted(set(ids) - set(owner)), sorted(set(owner) - set(ids))
    if missing or foreign:
        raise DataError(f"{writer.folder}: the shards miss {len(missing)} and add {len(foreign)} images of the "
                        f"{len(ids)} to merge (e.g. {(missing or foreign)[0]!r}): shards of another run?")
    for image_id in ids:
        writer.write(image_id, read_label_dir(owner[image_id], image_id))
