"""Small hand-made datasets shared by the tests."""
import numpy as np
from PIL import Image

from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import write_label_png


def make_dataset(tmp_path, sizes=((20, 28), (20, 28), (17, 23))) -> Dataset:
    """Random images of given (H, W) with labels {1}, {1, 3}, {2}."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    (root / "JPEGImages").mkdir(parents=True)
    labels = {"a": [1], "b": [1, 3], "c": [2]}
    for (image_id, classes), (h, w) in zip(labels.items(), sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((h, w), np.uint8)
        for index, c in enumerate(classes):
            mask[index * 4:index * 4 + 6, 3:12] = c
        mask[-1] = 255
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    return Dataset(root, ["background", "x", "y", "z"], {"train": list(labels), "val": []}, labels)
