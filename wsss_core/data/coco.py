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
import math
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from wsss_core.data.dataset import MAX_CLASSES, Dataset, check_image_id
from wsss_core.data.files import DEFAULT_MAX_PARSE_BYTES, ReadLimits, check_inside, read_json
from wsss_core.data.images import DEFAULT_MAX_PIXELS
from wsss_core.data.palette import VOID, write_label_png
from wsss_core.data.sources import COORDINATE_MARGIN, DEFAULT_MAX_ANNOTATION_BYTES, MAX_POLYGON_VALUES, CocoParams
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_annotations(path: Path, max_bytes: int = DEFAULT_MAX_ANNOTATION_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                     max_polygon_values: int = MAX_POLYGON_VALUES, margin: float = COORDINATE_MARGIN,
                     max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES) -> dict:
    """Return a COCO instance annotation JSON after checking every record the reader uses: ids are integers and
    unique, sizes positive integers of at most max_pixels pixels, segmentations polygons or RLE that fit their
    image (check_segmentation). A problem is a DataError naming the file, the list and the record's index. The file
    is at most max_bytes and parses within max_parse_bytes (files.read_json)."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    content = read_json(path, max_bytes, max_parse_bytes, "data.coco.max_annotation_bytes")
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list)
                                                for key in ("images", "annotations", "categories")):
        raise DataError(f"{path}: a COCO instance file needs the lists 'images', 'annotations' and 'categories'")
    for where, items, keys in (("images", content["images"], ("id", "file_name", "width", "height")),
                               ("annotations", content["annotations"], ("image_id", "category_id", "segmentation")),
                               ("categories", content["categories"], ("id", "name"))):
        for number, item in enumerate(items):
            if not isinstance(item, dict) or any(key not in item for key in keys):
                raise DataError(f"{path}: {where}[{number}] lacks one of {', '.join(keys)}")
    sizes: dict[int, tuple[int, int]] = {}
    for number, image in enumerate(content["images"]):
        where = f"{path}: images[{number}]"
        if not _is_int(image["id"]) or not isinstance(image["file_name"], str):
            raise DataError(f"{where}: id must be an integer and file_name a string")
        if image["id"] in sizes:
            raise DataError(f"{where}: image id {image['id']} is also listed earlier in the file")
        height, width = image["height"], image["width"]
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise DataError(f"{where}: height and width must be positive integers, got {height!r} and {width!r}")
        if height * width > max_pixels:
            raise DataError(f"{where}: {width}x{height} is more than data.max_pixels ({max_pixels}) pixels")
        sizes[image["id"]] = (height, width)
    for number, category in enumerate(content["categories"]):
        if not _is_int(category["id"]) or not isinstance(category["name"], str):
            raise DataError(f"{path}: categories[{number}]: id must be an integer and name a string")
    for number, annotation in enumerate(content["annotations"]):
        where = f"{path}: annotations[{number}]"
        if not _is_int(annotation["image_id"]) or not _is_int(annotation["category_id"]):
            raise DataError(f"{where}: image_id and category_id must be integers")
        if annotation.get("iscrowd", 0) not in (0, 1) or isinstance(annotation.get("iscrowd", 0), bool):
            raise DataError(f"{where}: iscrowd must be 0 or 1, got {annotation.get('iscrowd')!r}")
        if annotation["image_id"] in sizes:  # an unlisted image is reported by read_coco
            check_segmentation(annotation["segmentation"], *sizes[annotation["image_id"]], where, max_polygon_values,
                               margin)
    return content


def check_segmentation(segmentation, height: int, width: int, where: str, max_polygon_values: int = MAX_POLYGON_VALUES,
                       margin: float = COORDINATE_MARGIN) -> None:
    """Raise a DataError (prefixed with where) unless segmentation is what rasterise can decode within the image:
    polygons (a list of lists of at least 3 (x, y) pairs of finite numbers within `margin` x the image's size of
    it, max_polygon_values numbers in all) or an RLE whose size is [height, width] (uncompressed counts:
    non-negative integers summing to height x width; compressed: a string)."""
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(polygon, list) for polygon in segmentation):
            raise DataError(f"{where}: segmentation must be a non-empty list of polygons or an RLE object")
        if sum(len(polygon) for polygon in segmentation) > max_polygon_values:
            raise DataError(f"{where}: more than {max_polygon_values} polygon coordinates (data.coco.max_polygon_values)")
        low_x, high_x = -margin * width, (1 + margin) * width
        low_y, high_y = -margin * height, (1 + margin) * height
        for index, polygon in enumerate(segmentation):
            if len(polygon) < 6 or len(polygon) % 2:
                raise DataError(f"{where}: polygon {index} has {len(polygon)} numbers (an even count, at least 6)")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon):
                raise DataError(f"{where}: polygon {index} holds a value that is not a finite number")
            if not (all(low_x <= x <= high_x for x in polygon[0::2]) and all(low_y <= y <= high_y for y in polygon[1::2])):
                raise DataError(f"{where}: polygon {index} reaches beyond the {width}x{height} image (by more than "
                                f"{margin:.0%} of its size: data.coco.coordinate_margin)")
        return
    if not isinstance(segmentation, dict) or set(segmentation) != {"size", "counts"}:
        raise DataError(f"{where}: segmentation must be polygons or an RLE object {{size, counts}}, got "
                        f"{type(segmentation).__name__}")
    if segmentation["size"] != [height, width]:
        raise DataError(f"{where}: RLE size {str(segmentation['size'])[:40]} differs from the image's "
                        f"[{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(_is_int(count) and count >= 0 for count in counts) or sum(counts) != height * width:
            raise DataError(f"{where}: RLE counts must be non-negative integers summing to {height * width}")
    elif not isinstance(counts, str):
        raise DataError(f"{where}: RLE counts must be a list of integers or a compressed string")


def category_order(categories: list[dict], path: Path) -> tuple[list[str], dict[int, int]]:
    """Return (class names in category-id order, {category id: class index 1..K})."""
    ordered = sorted(categories, key=lambda category: category["id"])
    ids = [category["id"] for category in ordered]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: a category id is listed twice")
    if len(ids) > MAX_CLASSES:
        raise DataError(f"{path}: {len(ids)} categories, at most {MAX_CLASSES} fit a label map")
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
        if region.shape != labels.shape:  # a compressed RLE whose string decodes to another length
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


def read_coco(coco: CocoParams, limits: ReadLimits = ReadLimits(), *, workers: int = 0) -> Dataset:
    """Validate a COCO root (module docstring), rasterise its missing masks and return its Dataset.

    'train' and 'val' hold the images of each split's JSON that have at least one annotation (all of them
    with keep_unlabelled), restricted to the ids of `train_list` / `val_list` (files under root) when given.
    An id is the image's file name without its suffix. Every kept image is decoded once, in `workers`
    processes (0: one per core), and checked against the size its JSON gives. Annotation files are read by
    read_annotations (at most max_annotation_bytes, parsed within max_parse_bytes); images, lists and annotation files must resolve inside the
    root unless follow_links (files.check_inside).
    """
    root, train_split, val_split, train_list, val_list, crowd = (Path(coco.root), coco.train_split, coco.val_split,
                                                                 coco.train_list, coco.val_list, coco.crowd)
    max_pixels, follow_links = limits.max_pixels, limits.follow_links
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
    contents = [read_annotations(check_inside(path, root, follow_links), coco.max_annotation_bytes, max_pixels,
                                 coco.max_polygon_values, coco.coordinate_margin, limits.max_parse_bytes)
                for path in files]
    mask_folder = Path(coco.mask_cache) / cache_key(files, crowd)
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
            if Path(file_name).name != file_name:
                raise DataError(f"{path}: image {image['id']}: file name {file_name!r} is not a plain name")
            if image_id in images:
                raise DataError(f"{path}: image {image['id']}: id {image_id!r} is listed twice (also as "
                                f"{images[image_id]})")
            annotations = by_image[image["id"]]
            classes = sorted({class_of[a["category_id"]] for a in annotations})
            if not classes and not coco.keep_unlabelled:
                continue
            ids.append(image_id)
            labels[image_id] = classes
            images[image_id] = f"{split}/{file_name}"
            jobs.append((check_inside(root / images[image_id], root, follow_links), mask_folder / f"{image_id}.png", int(image["height"]),
                         int(image["width"]), annotations))
        if id_list:
            listed = read_id_list(check_inside(root / id_list, root, follow_links))
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
