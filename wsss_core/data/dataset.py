"""The prepared dataset: a VOC-layout root, class names, splits and image-level labels.

`prepare` writes it as a JSON manifest; every later stage reads images, masks and labels
through it, whatever the source (synthetic or VOC).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss_core.data.images import DEFAULT_MAX_PIXELS, image_size, read_rgb
from wsss_core.data.palette import read_label_png
from wsss_core.errors import DataError
from wsss_core.io import atomic_path

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""An image id is a plain file name: it cannot name a folder, leave the dataset root or nest HDF5 groups."""


IMAGE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*/[A-Za-z0-9][A-Za-z0-9_.-]*\.(jpg|jpeg|png)")
"""An image's path under the root in a manifest: one plain folder (images/, train2014/, ...) and a plain name."""


MAX_CLASSES = 254  # foreground classes at most: label maps are uint8, 0 background, 255 ignore
MAX_ID_LENGTH = 200  # characters; file systems allow 255 bytes a name, and ids get suffixes (.png, .shard-...)


def check_image_id(image_id: str, where: str) -> str:
    """Return image_id if it is a plain name (letters, digits, '_', '.', '-') of at most MAX_ID_LENGTH characters,
    else raise a DataError naming `where`."""
    if isinstance(image_id, str) and len(image_id) > MAX_ID_LENGTH:
        raise DataError(f"{where}: image id {image_id[:40]!r}... is {len(image_id)} characters long (at most "
                        f"{MAX_ID_LENGTH})")
    if not isinstance(image_id, str) or not PLAIN_ID.fullmatch(image_id) or ".." in image_id:
        raise DataError(f"{where}: image id {str(image_id)[:80]!r} is not a plain name (letters, digits, '_', '.', "
                        "'-'; no folders, no '..')")
    return image_id


@dataclass
class Dataset:
    """A VOC-layout dataset. `labels[id]` lists the foreground classes (1..K) in the image."""

    root: Path
    class_names: list[str]  # index 0 is "background"
    splits: dict[str, list[str]]
    labels: dict[str, list[int]]
    mask_dirs: tuple[str, ...] = ("SegmentationClass",)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (see wsss_core.data.images)
    images: dict[str, str] | None = None  # {id: path under root}; None: JPEGImages/<id>.jpg (VOC layout)
    # The ids that had a mask when the manifest was written (so a mask added later changes the manifest and
    # re-scores); None: look for the file.
    masked: frozenset[str] | None = None
    # The folder holding `mask_dirs` when it is not root (COCO: masks rasterised into a cache; see coco.py).
    mask_root: Path | None = None

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K."""
        return len(self.class_names) - 1

    def ids(self, split: str) -> list[str]:
        """Return the image ids of a split ('train' or 'val')."""
        if split not in self.splits:
            raise DataError(f"dataset has no split {split!r} (has: {', '.join(self.splits)})")
        return self.splits[split]

    def image_path(self, image_id: str) -> Path:
        """Return the image file of an id."""
        if self.images is not None:
            return self.root / self.images[image_id]
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def has_mask(self, image_id: str) -> bool:
        """Return whether the image has a ground-truth mask (a tags dataset may have none, or some)."""
        if self.masked is not None:
            return image_id in self.masked
        return self.mask_path(image_id).is_file()

    def scored_ids(self, ids: list[str]) -> list[str]:
        """Return the ids (in order) that have a ground-truth mask: the ones a score can use."""
        return [image_id for image_id in ids if self.has_mask(image_id)]

    def mask_path(self, image_id: str) -> Path:
        """Return the first existing mask among `mask_dirs` (the last one if none exists)."""
        for folder in self.mask_dirs:
            path = (self.mask_root or self.root) / folder / f"{image_id}.png"
            if path.exists():
                return path
        return path

    def read_image(self, image_id: str) -> np.ndarray:
        """Return the image as uint8 [H, W, 3] RGB."""
        return read_rgb(self.image_path(image_id), self.max_pixels)

    def read_mask(self, image_id: str) -> np.ndarray:
        """Return the ground-truth label map as uint8 [H, W] (0..K, 255 void)."""
        return read_label_png(self.mask_path(image_id))

    def label_vector(self, image_id: str) -> np.ndarray:
        """Return the image-level labels as a float32 multi-hot vector [K]."""
        vector = np.zeros(self.num_classes, dtype=np.float32)
        vector[np.asarray(self.labels[image_id], dtype=np.int64) - 1] = 1.0
        return vector

    def save(self, path: str | Path) -> None:
        """Write the manifest JSON (root stored relative to the manifest's folder when inside it)."""
        path = Path(path)
        manifest = {
            "root": _relative_to(self.root, path.parent),
            "class_names": self.class_names,
            "mask_dirs": list(self.mask_dirs),
            "splits": self.splits,
            "labels": self.labels,
            "max_pixels": self.max_pixels,
            **({"images": self.images} if self.images is not None else {}),
            **({"mask_root": _relative_to(self.mask_root, path.parent)} if self.mask_root is not None else {}),
            "masked": sorted({image_id for ids in self.splits.values() for image_id in ids if self.has_mask(image_id)}),
        }
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Dataset":
        """Read a manifest written by `save`; every id in it must be a plain name."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: dataset manifest not found (run the prepare stage first)")
        try:
            manifest = json.loads(path.read_text())
            dataset = cls(
                root=(path.parent / manifest["root"]),
                class_names=list(manifest["class_names"]),
                splits={k: list(v) for k, v in manifest["splits"].items()},
                labels={k: [int(c) for c in v] for k, v in manifest["labels"].items()},
                mask_dirs=tuple(manifest["mask_dirs"]),
                max_pixels=int(manifest.get("max_pixels", DEFAULT_MAX_PIXELS)),
                images=dict(manifest["images"]) if "images" in manifest else None,
                masked=frozenset(manifest["masked"]) if "masked" in manifest else None,
                mask_root=(path.parent / manifest["mask_root"]) if "mask_root" in manifest else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise DataError(f"{path}: not a valid dataset manifest ({err})") from None
        for image_id in [*dataset.labels, *(i for ids in dataset.splits.values() for i in ids), *(dataset.masked or ())]:
            check_image_id(image_id, str(path))
        for image_id, file in (dataset.images or {}).items():
            check_image_id(image_id, str(path))
            if not IMAGE_FILE.fullmatch(file) or Path(file).stem != image_id:
                raise DataError(f"{path}: image {file!r} of {image_id!r} is not <folder>/<id>.jpg|jpeg|png")
        return dataset


def _relative_to(folder: Path, base: Path) -> str:
    """Return folder as text, relative to base when inside it (so a manifest moves with its repo), else absolute."""
    folder = Path(folder).resolve()
    try:
        return str(folder.relative_to(base.resolve()))
    except ValueError:
        return str(folder)


def size_batches(dataset: Dataset, ids: list[str], batch_size: int) -> list[list[str]]:
    """Group ids into batches of equal (upright) image size, at most batch_size each, keeping id order within a size."""
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[image_size(dataset.image_path(image_id), dataset.max_pixels)].append(image_id)
    return [group[start:start + batch_size] for group in by_size.values() for start in range(0, len(group), batch_size)]
