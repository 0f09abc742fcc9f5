"""Tiny COCO-format sets written by the tests, with their masks rasterised by hand (pixel centres in polygons)."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Listed out of id order, with COCO's gaps: the reader must order them by id (1, 3, 18, 90 -> classes 1..4).
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"},
              {"id": 3, "name": "car"}]
CLASS_OF = {1: 1, 3: 2, 18: 3, 90: 4}
COLOURS = {1: (220, 40, 40), 3: (40, 200, 60), 18: (40, 60, 220), 90: (230, 210, 40)}


def rectangle(x0, y0, x1, y1) -> list[float]:
    """Return the COCO polygon of the box [x0, x1) x [y0, y1) (pixel i covers [i, i + 1))."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def inside(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Return bool [height, width]: pixel centres strictly inside a convex polygon (either winding)."""
    points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    ys, xs = np.mgrid[:height, :width] + 0.5
    sides = []
    for (ax, ay), (bx, by) in zip(points, np.roll(points, -1, axis=0)):
        sides.append((bx - ax) * (ys - ay) - (by - ay) * (xs - ax))
    sides = np.stack(sides)
    return (sides > 0).all(axis=0) | (sides < 0).all(axis=0)


def uncompressed_rle(region: np.ndarray) -> dict:
    """Return COCO's uncompressed RLE of a bool [H, W] region: column-major runs, starting with a zero run."""
    flat = region.T.reshape(-1).astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(region.shape), "counts": counts}


def expected_mask(height: int, width: int, objects: list[dict], crowd_value: int | None = 255) -> np.ndarray:
    """Paint by hand: crowd regions first (crowd_value; None: their class), then instances in order."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for obj in sorted(objects, key=lambda o: not o.get("iscrowd", 0)):
        region = obj["region"] if "region" in obj else np.any([inside(p, height, width) for p in obj["polygons"]], 0)
        crowd = obj.get("iscrowd", 0)
        labels[region] = CLASS_OF[obj["category"]] if not crowd or crowd_value is None else crowd_value
    return labels


def write_split(root: Path, split: str, images: list[tuple[str, int, int, list[dict]]], seed: int = 0) -> None:
    """Write root/<split>/<name>.jpg (objects drawn in their class colour on noise) and the split's JSON.

    images: (name, width, height, objects); an object has 'category' and either 'polygons' (a list of COCO
    polygons) or 'region' (bool [H, W], written as uncompressed RLE), and optionally 'iscrowd'.
    """
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    entries, annotations = [], []
    for number, (name, width, height, objects) in enumerate(images, start=1):
        pixels = rng.integers(90, 150, size=(height, width, 3)).astype(np.float64)
        for obj in objects:
            region = expected_mask(height, width, [{**obj, "iscrowd": 0}]) > 0
            pixels[region] = np.asarray(COLOURS[obj["category"]]) + rng.normal(0, 12, size=(int(region.sum()), 3))
            segmentation = obj["polygons"] if "polygons" in obj else uncompressed_rle(obj["region"])
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": obj["category"],
                                "segmentation": segmentation, "iscrowd": obj.get("iscrowd", 0), "area": 1.0,
                                "bbox": [0, 0, 1, 1]})
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / f"{name}.jpg", quality=95)
        entries.append({"id": number, "file_name": f"{name}.jpg", "width": width, "height": height})
    content = {"images": entries, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


def random_objects(rng: np.random.Generator, width: int, height: int) -> list[dict]:
    """Return 1-2 objects, each a box or a right triangle of a random category, at least 16 px a side."""
    objects = []
    for _ in range(rng.integers(1, 3)):
        x0, y0 = int(rng.integers(0, width - 24)), int(rng.integers(0, height - 24))
        x1, y1 = int(rng.integers(x0 + 16, width + 1)), int(rng.integers(y0 + 16, height + 1))
        shape = rectangle(x0, y0, x1, y1) if rng.random() < 0.5 else [x0, y0, x1, y1, x0, y1]
        objects.append({"category": int(rng.choice(list(CLASS_OF))), "polygons": [shape]})
    return objects


def write_random_set(root: Path, n_train: int, n_val: int, width: int = 96, height: int = 80, seed: int = 0) -> None:
    """Write a COCO-format set of random boxes and triangles, split train2014 / val2014."""
    rng = np.random.default_rng(seed)
    for split, count in (("train2014", n_train), ("val2014", n_val)):
        images = [(f"COCO_{split}_{index:012d}", width, height, random_objects(rng, width, height))
                  for index in range(count)]
        write_split(root, split, images, seed=seed)
