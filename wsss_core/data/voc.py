"""Reader for a PASCAL VOC 2012 style root, with thorough validation of every listed id."""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from wsss_core.data.dataset import VOC_CLASSES, Dataset, check_image_id
from wsss_core.data.files import DEFAULT_MAX_TEXT_BYTES, ReadLimits, check_inside, read_text
from wsss_core.data.images import image_size, read_rgb
from wsss_core.data.palette import VOID
from wsss_core.data.sources import VocParams
from wsss_core.errors import DataError


def read_id_list(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """Return the ids in a VOC list file (first token of each non-empty line).

    Every id must be a plain name (no folders, no '..': nothing outside the dataset root is read)
    and listed once; a problem is a DataError naming the file and line.
    """
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_text(path, max_bytes).splitlines(), start=1):
        if not line.strip():
            continue
        image_id = check_image_id(line.split()[0], f"{path}:{number}")
        if image_id in first_line:
            raise DataError(f"{path}:{number}: id {image_id!r} is listed twice (first on line {first_line[image_id]})")
        first_line[image_id] = number
        ids.append(image_id)
    if not ids:
        raise DataError(f"{path}: list file is empty")
    return ids


def carve_val(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ids into (train, val) with round(fraction * n) val ids drawn by a seeded shuffle.

    Both lists keep the input order.
    """
    count = int(round(fraction * len(ids)))
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    train = [image_id for index, image_id in enumerate(ids) if index not in chosen]
    val = [image_id for index, image_id in enumerate(ids) if index in chosen]
    return train, val


def check_image_file(path: Path, max_pixels: int) -> tuple[int, int]:
    """Decode the image (at reduced scale for JPEG) and return its upright (width, height)."""
    read_rgb(path, max_pixels, draft=True)
    return image_size(path, max_pixels)


def mask_classes(path: Path, image_size: tuple[int, int], num_classes: int) -> list[int]:
    """Validate a mask against its image and return its foreground classes (sorted, 1..K)."""
    try:
        with Image.open(path) as mask_image:
            if mask_image.size != image_size:
                raise DataError(
                    f"{path}: mask size {mask_image.size[0]}x{mask_image.size[1]} differs from "
                    f"its image {image_size[0]}x{image_size[1]}"
                )
            if mask_image.mode not in ("P", "L"):
                raise DataError(f"{path}: mask must be a palette or greyscale PNG, got mode {mask_image.mode}")
            values = np.unique(np.asarray(mask_image))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable or corrupt mask ({err})") from None
    bad = [int(v) for v in values if v > num_classes and v != VOID]
    if bad:
        raise DataError(f"{path}: mask values {bad} outside 0..{num_classes} and {VOID}")
    return [int(v) for v in values if 0 < v <= num_classes]


def _xml_classes(path: Path, class_names: tuple[str, ...] | list[str]) -> list[int]:
    """Return the sorted class indices of the objects named in a VOC Annotations XML file."""
    try:
        names = {node.text.strip() for node in ElementTree.parse(path).getroot().iter("name")
                 if node.text and node.text.strip() in class_names}
    except ElementTree.ParseError as err:
        raise DataError(f"{path}: unreadable annotation XML ({err})") from None
    return sorted(class_names.index(name) for name in names)


def read_voc(voc: VocParams, limits: ReadLimits = ReadLimits(), *, seed: int = 0,
             class_names: tuple[str, ...] | list[str] = VOC_CLASSES, progress: bool = True) -> Dataset:
    """Validate a VOC root and return its Dataset with 'train' and 'val' splits.

    Labels come from `Annotations/<id>.xml` when present, else from the mask. Without `val_list`,
    `val_fraction` of the train ids become val (seeded). Every listed image is decoded once so a
    corrupt or too large file is reported here, naming it, rather than mid-training. An empty
    train or val split, or an id in both, is a DataError. List files are UTF-8 of at most max_text_bytes;
    they, the images and the masks must resolve inside the root unless follow_links (files.check_inside).
    """
    root, train_list, val_list, val_fraction = Path(voc.root), voc.train_list, voc.val_list, voc.val_fraction
    max_pixels, max_text_bytes, follow_links = limits.max_pixels, limits.max_text_bytes, limits.follow_links
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    train_ids = read_id_list(check_inside(root / train_list, root, follow_links), max_text_bytes)
    if val_list:
        val_ids = read_id_list(check_inside(root / val_list, root, follow_links), max_text_bytes)
    else:
        listed = len(train_ids)
        train_ids, val_ids = carve_val(train_ids, val_fraction, seed)
        for split, ids in (("train", train_ids), ("val", val_ids)):
            if not ids:
                raise DataError(f"{root / train_list}: carving val_fraction {val_fraction} of its {listed} ids leaves "
                                f"the {split} split empty (list more ids, change data.voc.val_fraction or give "
                                "data.voc.val_list)")
    both = sorted(set(train_ids) & set(val_ids))
    if both:
        raise DataError(f"{root / val_list}: {len(both)} val ids are also train ids (e.g. {both[0]!r})")
    mask_dirs = ("SegmentationClassAug", "SegmentationClass") if voc.use_aug else ("SegmentationClass",)
    dataset = Dataset(root=root, class_names=list(class_names),
                      splits={"train": train_ids, "val": val_ids}, labels={}, mask_dirs=mask_dirs,
                      max_pixels=max_pixels)
    for image_id in tqdm(train_ids + val_ids, desc="checking dataset", unit="img", disable=not progress):
        size = check_image_file(check_inside(dataset.image_path(image_id), root, follow_links), max_pixels)
        mask_path = check_inside(dataset.mask_path(image_id), root, follow_links)
        xml_path = check_inside(root / "Annotations" / f"{image_id}.xml", root, follow_links)
        if mask_path.is_file():
            classes = mask_classes(mask_path, size, len(class_names) - 1)
        elif not xml_path.is_file():
            raise DataError(f"{mask_path}: mask not found (and no {xml_path.name} for labels)")
        if xml_path.is_file():
            classes = _xml_classes(xml_path, class_names)
        dataset.labels[image_id] = classes
    return dataset
