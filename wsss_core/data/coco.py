"""Reader for MS COCO 2014 (or any set in its format): instance annotations become VOC-layout label PNGs.

Layout of `root` (COCO's own):

    train2014/<file_name>                 the images each annotation JSON lists (any plain file names)
    val2014/<file_name>
    annotations/instances_train2014.json  COCO instance annotations: images, annotations, categories
    annotations/instances_val2014.json

The classes are the JSON's categories in the order of their ids (COCO: the 80 categories, ids 1..90 with
gaps, become 1..80), after background 0. An image's labels are the categories of all its annotations, crowd
ones included. The label PNGs are rasterised once, through pycocotools, into
`<mask_cache>/<key>/<id>.png`, where the key hashes the annotation files and the rasterising rule, so a
second `prepare` (or another repo sharing the cache) re-uses them; a changed annotation file gets new masks.

Rasterising rule (no paper states one; docs/coco.md): crowd regions first, as `crowd` says (ignore: 255,
class: their category, background: 0), then every non-crowd instance in the JSON's order, each painting
its category over what is below, so a later instance wins where two overlap.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from wsss_core.data.dataset import Dataset, check_image_id
from wsss_core.data.images import DEFAULT_MAX_PIXELS
from wsss_core.data.palette import VOID, write_label_png
from wsss_core.data.voc import check_image_file, read_id_list
from wsss_core.errors import DataError
from wsss_core.io import atomic_path
from wsss_core.pool import run_pool

CROWD_RULES = ("ignore", "class", "background")
MASK_FORMAT = "coco-masks-v1"
"""Part of the cache key: bump it when the rasterising rule changes, so old masks are not re-used."""


def annotation_file(root: Path, split: str) -> Path:
    """Return the instance annotation JSON of a split (root/annotations/instances_<split>.json)."""
    return root / "annotations" / f"instances_{split}.json"


def read_annotations(path: Path) -> dict:
    """Return a COCO instance annotation JSON after checking the keys and types the reader uses."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list)
                                                for key in ("images", "annotations", "categories")):
        raise DataError(f"{path}: a COCO instance file needs the lists 'images', 'annotations' and 'categories'")
    for where, items, keys in (("images", content["images"], ("id", "file_name", "width", "height")),
                               ("annotations", content["annotations"], ("image_id", "category_id", "segmentation")),
                               ("categories", content["categories"], ("id", "name"))):
        for number, item in enumerate(items):
            if not isinstance(item, dict) or any(key not in item for key in keys):
                raise DataError(f"{path}: {where}[{number}] lacks one of {', '.join(keys)}")
    return content


def category_order(categories: list[dict], path: Path) -> tuple[list[str], dict[int, int]]:
    """Return (class names in category-id order, {category id: class index 1..K})."""
    ordered = sorted(categories, key=lambda category: category["id"])
    ids = [category["id"] for category in ordered]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: a category id is listed twice")
    names = [str(category["name"]) for category in ordered]
    if "background" in names:
        raise DataError(f"{path}: a category is named 'background', which is class 0")
    return names, {category_id: index for index, category_id in enumerate(ids, start=1)}


def rasterise(height: int, width: int, annotations: list[dict], class_of: dict[int, int], crowd: str) -> np.ndarray:
    """Return the label map uint8 [height, width] of an image's annotations (rule: module docstring)."""
    from pycocotools import mask as coco_mask

    labels = np.zeros((height, width), dtype=np.uint8)
    crowd_value = {"ignore": VOID, "background": 0}
    ordered = [a for a in annotations if a.get("iscrowd", 0)] + [a for a in annotations if not a.get("iscrowd", 0)]
    for annotation in ordered:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons: [x1, y1, x2, y2, ...] each, in pixel coordinates
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:  # compressed RLE
            rle = segmentation
        with warnings.catch_warnings():  # pycocotools 2.0.11 on numpy 2: a DeprecationWarning per decode
            warnings.simplefilter("ignore", DeprecationWarning)
            region = coco_mask.decode(rle).astype(bool)
        if region.shape != labels.shape:
            raise ValueError(f"segmentation of size {region.shape} in an image of {labels.shape}")
        if annotation.get("iscrowd", 0):
            labels[region] = crowd_value.get(crowd, class_of[annotation["category_id"]])
        else:
            labels[region] = class_of[annotation["category_id"]]
    return labels


def _check_and_rasterise(job: tuple, class_of: dict[int, int], crowd: str, max_pixels: int) -> str | None:
    """Check one image against its JSON size and write its mask if missing; return an error line or None."""
    image_path, mask_path, height, width, annotations = job
    try:
        size = check_image_file(image_path, max_pixels)
    except DataError as err:
        return str(err)
    if size != (width, height):
        return f"{image_path}: image is {size[0]}x{size[1]}, its annotation file says {width}x{height}"
    if not mask_path.is_file():
        try:
            labels = rasterise(height, width, annotations, class_of, crowd)
        except (ValueError, TypeError, KeyError) as err:
            return f"{image_path}: unreadable segmentation in its annotations ({err})"
        with atomic_path(mask_path) as temporary:
            write_label_png(temporary, labels)
    return None


def cache_key(files: list[Path], crowd: str) -> str:
    """Return 16 hex digits naming the masks of these annotation files under this crowd rule."""
    digest = hashlib.sha256(f"{MASK_FORMAT}:{crowd}".encode())
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_coco(root: str | Path, train_split: str = "train2014", val_split: str = "val2014", train_list: str = "",
              val_list: str = "", keep_unlabelled: bool = False, crowd: str = "ignore",
              mask_cache: str | Path = "data/coco_masks", workers: int = 0,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """Validate a COCO root (module docstring), rasterise its missing masks and return its Dataset.

    'train' and 'val' hold the images of each split's JSON that have at least one annotation (all of them
    with keep_unlabelled), restricted to the ids of `train_list` / `val_list` (files under root) when given.
    An id is the image's file name without its suffix. Every kept image is decoded once, in `workers`
    processes (0: one per core), and checked against the size its JSON gives.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    if importlib.util.find_spec("pycocotools") is None:
        raise DataError("data.name=coco reads masks through pycocotools, which is not installed "
                        "(pip install -e '.[coco]')")
    if crowd not in CROWD_RULES:
        raise DataError(f"crowd rule {crowd!r}: use one of {', '.join(CROWD_RULES)}")
    splits, labels, images, jobs = {}, {}, {}, []
    class_names: list[str] | None = None
    files = [annotation_file(root, split) for split in (train_split, val_split)]
    contents = [read_annotations(path) for path in files]
    mask_folder = Path(mask_cache) / cache_key(files, crowd)
    for name, split, path, content, id_list in zip(("train", "val"), (train_split, val_split), files, contents,
                                                   (train_list, val_list)):
        names, class_of = category_order(content["categories"], path)
        if class_names is None:
            class_names, first_class_of = names, class_of
        elif (names, class_of) != (class_names, first_class_of):
            raise DataError(f"{path}: its categories differ from those of {files[0]}")
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in content["images"]}
        for number, annotation in enumerate(content["annotations"]):
            if annotation["image_id"] not in by_image:
                raise DataError(f"{path}: annotations[{number}] names image {annotation['image_id']}, which is not listed")
            if annotation["category_id"] not in class_of:
                raise DataError(f"{path}: annotations[{number}] has category {annotation['category_id']}, "
                                "which is not listed")
            by_image[annotation["image_id"]].append(annotation)
        ids = []
        for image in content["images"]:
            file_name = str(image["file_name"])
            image_id = check_image_id(Path(file_name).stem, f"{path}: image {image['id']}")
            if Path(file_name).name != file_name or image_id in images:
                raise DataError(f"{path}: image file {file_name!r} is not a plain name, or listed twice")
            annotations = by_image[image["id"]]
            classes = sorted({class_of[a["category_id"]] for a in annotations})
            if not classes and not keep_unlabelled:
                continue
            ids.append(image_id)
            labels[image_id] = classes
            images[image_id] = f"{split}/{file_name}"
            jobs.append((root / images[image_id], mask_folder / f"{image_id}.png", int(image["height"]),
                         int(image["width"]), annotations))
        if id_list:
            listed = read_id_list(root / id_list)
            unknown = sorted(set(listed) - set(ids))
            if unknown:
                raise DataError(f"{root / id_list}: id {unknown[0]!r} is not a labelled image of {path.name}")
            ids = listed
        if not ids:
            raise DataError(f"{path}: no image with an annotation (the {name} split is empty)")
        splits[name] = ids
    kept = set(splits["train"]) | set(splits["val"])  # disjoint: an id is listed in one JSON only
    jobs = [job for job in jobs if job[1].stem in kept]
    check = partial(_check_and_rasterise, class_of=first_class_of, crowd=crowd, max_pixels=max_pixels)
    for error in run_pool(check, jobs, workers, total=len(jobs), desc="checking images, rasterising masks"):
        if error:
            raise DataError(error)
    return Dataset(root=root, class_names=["background", *class_names], splits=splits,
                   labels={image_id: labels[image_id] for image_id in sorted(kept)},
                   images={image_id: images[image_id] for image_id in sorted(kept)}, mask_dirs=(mask_folder.name,),
                   mask_root=mask_folder.parent, max_pixels=max_pixels)
