"""Reader for your own images with image-level tags only: `images/` plus a labels file, any class list.

Layout of `root`:

    images/<id>.jpg | .jpeg | .png     any sizes
    labels.csv                         `id,labels` rows, labels separated by ';' or spaces (a header row
                                       `id,labels` is allowed), or labels.json {id: [names]}
    classes.txt                        optional: one class name a line (background is implicit); without
                                       it the classes are the labels file's names in first-seen order
    masks/<id>.png                     optional, for some images: palette or greyscale PNGs, 0 background,
                                       255 ignore; used only for scoring
    val.txt                            optional: the val ids, one a line (else a carved fraction)

An image whose only tag is the background marker (`background`) shows no class. Every image (and mask) is
decoded once here, so a bad file is reported now, naming it, with one line.
"""
from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from wsss_core.data.dataset import MAX_CLASSES, Dataset, check_image_id
from wsss_core.data.files import (DEFAULT_MAX_PARSE_BYTES, DEFAULT_MAX_TEXT_BYTES, ReadLimits, check_inside,
                                  read_csv_rows, read_json, read_text)
from wsss_core.data.sources import TagsParams
from wsss_core.data.voc import carve_val, check_image_file, mask_classes, read_id_list
from wsss_core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_DIR, MASK_DIR = "images", "masks"
BACKGROUND = "background"
TAG_SEPARATORS = re.compile(r"[;\s]+")


def read_class_list(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """Return the class names of a classes file (one a line, blank lines skipped), each once, no background."""
    names: list[str] = []
    for number, line in enumerate(read_text(path, max_bytes).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name == BACKGROUND:
            raise DataError(f"{path}:{number}: {BACKGROUND!r} is implicit (class 0); do not list it")
        if not name.isprintable():
            raise DataError(f"{path}:{number}: class {name!r} holds a control character")
        if name in names:
            raise DataError(f"{path}:{number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def read_tag_file(path: Path, max_bytes: int = DEFAULT_MAX_TEXT_BYTES,
                  max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES) -> dict[str, list[str]]:
    """Return {id: [tag names]} in file order from a CSV (`id,labels`) or JSON ({id: [names]}) labels file
    (UTF-8; an id listed twice, in either format, is a DataError naming it)."""
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    if path.suffix.lower() == ".json":
        raw = read_json(path, max_bytes, max_parse_bytes)
        if not isinstance(raw, dict):
            raise DataError(f"{path}: must map each image id to a list of class names")
        for image_id, names in raw.items():
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise DataError(f"{path}: image {image_id[:80]!r} must map to a list of class names, got "
                                f"{type(names).__name__}")
        return {check_image_id(image_id, str(path)): [n.strip() for n in names] for image_id, names in raw.items()}
    tags: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for number, row in read_csv_rows(path, max_bytes):
        if not row or not "".join(row).strip() or (number == 1 and [c.strip() for c in row] == ["id", "labels"]):
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{number}: expected `id,labels`, got {len(row)} fields")
        image_id = check_image_id(row[0].strip(), f"{path}:{number}")
        if image_id in tags:
            raise DataError(f"{path}:{number}: image id {image_id!r} is listed twice (first on line "
                            f"{first_line[image_id]})")
        first_line[image_id] = number
        tags[image_id] = [name for name in TAG_SEPARATORS.split(row[1].strip()) if name]
    if not tags:
        raise DataError(f"{path}: no image is listed")
    return tags


def _image_file(root: Path, image_id: str, follow_links: bool) -> str:
    """Return the image's path relative to root (images/<id> with one of IMAGE_SUFFIXES), inside the root unless
    follow_links (files.check_inside)."""
    found = [f"{IMAGE_DIR}/{image_id}{suffix}" for suffix in IMAGE_SUFFIXES
             if (root / IMAGE_DIR / f"{image_id}{suffix}").is_file()]
    if not found:
        raise DataError(f"{root / IMAGE_DIR}: no image for id {image_id!r} ({', '.join(IMAGE_SUFFIXES)})")
    if len(found) > 1:
        raise DataError(f"{root / IMAGE_DIR}: id {image_id!r} has several images ({', '.join(found)})")
    check_inside(root / found[0], root, follow_links)
    return found[0]


def read_tags(tags: TagsParams, limits: ReadLimits = ReadLimits(), *, seed: int = 0, progress: bool = True) -> Dataset:
    """Validate a tags root (module docstring) and return its Dataset with 'train' and 'val' splits.

    `classes` is read when the file exists; `val_list` (relative to root) names the val ids, else
    `val_fraction` of the ids are carved (seeded). Masks, where present, are checked against their image.
    The labels, classes and val files are UTF-8 of at most max_text_bytes (a JSON labels file parses within
    max_parse_bytes); images, masks and those files must
    resolve inside the root unless follow_links (files.check_inside).
    """
    root, labels, classes, val_list, val_fraction = (Path(tags.root), tags.labels, tags.classes, tags.val_list,
                                                     tags.val_fraction)
    max_pixels, max_text_bytes, follow_links = limits.max_pixels, limits.max_text_bytes, limits.follow_links
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    tags = read_tag_file(check_inside(root / labels, root, follow_links), max_text_bytes, limits.max_parse_bytes)
    class_file = check_inside(root / classes, root, follow_links)
    if class_file.is_file():
        class_names = read_class_list(class_file, max_text_bytes)
    else:
        class_names = list(dict.fromkeys(name for names in tags.values() for name in names if name != BACKGROUND))
        if not class_names:
            raise DataError(f"{root / labels}: no class name besides {BACKGROUND!r} (and no {classes})")
    if len(class_names) > MAX_CLASSES:
        raise DataError(f"{class_file if class_file.is_file() else root / labels}: {len(class_names)} classes, at most "
                        f"{MAX_CLASSES} fit a label map")
    index = {name: number for number, name in enumerate(class_names, start=1)}
    labels_of: dict[str, list[int]] = {}
    for image_id, names in tags.items():
        unprintable = [name for name in names if not name.isprintable()]
        if unprintable:
            raise DataError(f"{root / labels}: image {image_id!r} has the tag {unprintable[0]!r}, which holds a "
                            "control character")
        unknown = [name for name in names if name != BACKGROUND and name not in index]
        if unknown:
            raise DataError(f"{root / labels}: image {image_id!r} has class {unknown[0]!r}, which is not in "
                            f"{class_file if class_file.is_file() else 'the class list'}")
        if not names:
            raise DataError(f"{root / labels}: image {image_id!r} has no tag (write {BACKGROUND!r} for an image "
                            "that shows no class)")
        labels_of[image_id] = sorted({index[name] for name in names if name != BACKGROUND})
    ids = list(tags)
    if val_list:
        val_ids = read_id_list(check_inside(root / val_list, root, follow_links), max_text_bytes)
        missing = [image_id for image_id in val_ids if image_id not in tags]
        if missing:
            raise DataError(f"{root / val_list}: id {missing[0]!r} has no tags in {root / labels}")
        held_out = set(val_ids)
        train_ids = [image_id for image_id in ids if image_id not in held_out]
    else:
        train_ids, val_ids = carve_val(ids, val_fraction, seed)
    if not train_ids:
        raise DataError(f"{root / labels}: the train split is empty (list more images or fewer val ids)")
    images = {image_id: _image_file(root, image_id, follow_links) for image_id in ids}
    dataset = Dataset(root=root, class_names=[BACKGROUND, *class_names], splits={"train": train_ids, "val": val_ids},
                      labels=labels_of, mask_dirs=(MASK_DIR,), max_pixels=max_pixels, images=images)
    for image_id in tqdm(ids, desc="checking dataset", unit="img", disable=not progress):
        size = check_image_file(dataset.image_path(image_id), max_pixels)
        if dataset.has_mask(image_id):
            mask_classes(check_inside(dataset.mask_path(image_id), root, follow_links), size, len(class_names))
    return dataset
