import csv

import numpy as np
import pytest
from PIL import Image

from wsss_core.data.dataset import VOC_CLASSES, Dataset
from wsss_core.data.palette import write_label_png
from wsss_core.data.sources import VocParams
from wsss_core.data.voc import carve_val, read_voc
from wsss_core.errors import DataError


def make_root(tmp_path, masks: dict):
    """A tiny VOC root: one 8x6 image per mask, listed in train.txt, plus a valid id "zz" so that a split can be carved."""
    masks = {**masks, "zz": mask_with(1)}
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for image_id, mask in masks.items():
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(masks) + "\n")
    return root


def mask_with(*classes):
    mask = np.zeros((6, 8), np.uint8)
    for index, value in enumerate(classes):
        mask[index, :] = value
    return mask


def test_labels_from_masks_and_void_ignored(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(15, 255, 3), "b": mask_with(20), "c": mask_with(1), "d": mask_with(2)})
    dataset = read_voc(VocParams(root=str(root), val_fraction=0.2), seed=1, progress=False)
    assert dataset.labels == {"a": [3, 15], "b": [20], "c": [1], "d": [2], "zz": [1]}
    assert len(dataset.ids("val")) == 1 and len(dataset.ids("train")) == 4
    assert sorted(dataset.ids("train") + dataset.ids("val")) == ["a", "b", "c", "d", "zz"]
    vector = dataset.label_vector("a")
    assert vector.shape == (20,) and vector.sum() == 2 and vector[2] == 1 and vector[14] == 1


def test_labels_from_xml_when_present(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(15)})
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>dog</name></object><object><name>cat</name></object></annotation>")
    dataset = read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)
    assert dataset.labels["a"] == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")]


def test_aug_masks_preferred_when_enabled(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(15), "b": mask_with(1)})
    write_label_png(root / "SegmentationClassAug" / "a.png", mask_with(7))
    assert read_voc(VocParams(root=str(root), val_fraction=0.5, use_aug=True), progress=False).labels["a"] == [7]
    assert read_voc(VocParams(root=str(root), val_fraction=0.5, use_aug=False), progress=False).labels["a"] == [15]


def test_carve_val_is_seeded_and_disjoint():
    ids = [str(i) for i in range(50)]
    train, val = carve_val(ids, 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val, key=int) == ids
    assert carve_val(ids, 0.2, seed=3) == (train, val)
    assert carve_val(ids, 0.2, seed=4)[1] != val


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere: dataset root not found"):
        read_voc(VocParams(root=str(tmp_path / "nowhere")))


def test_missing_list_file(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(1)})
    with pytest.raises(DataError, match="val.txt: list file not found"):
        read_voc(VocParams(root=str(root), val_list="ImageSets/Segmentation/val.txt"), progress=False)


def test_id_without_image(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(1)})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nghost\nzz\n")
    with pytest.raises(DataError, match="ghost.jpg: image not found"):
        read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)


def test_mask_size_mismatch(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(1)})
    write_label_png(root / "SegmentationClass" / "a.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DataError, match=r"a.png: mask size 8x5 differs from its image 8x6"):
        read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)


def test_mask_values_out_of_range(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(21, 254)})
    with pytest.raises(DataError, match=r"a.png: mask values \[21, 254\] outside 0..20 and 255"):
        read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)


def test_corrupt_image_named(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(1)})
    data = (root / "JPEGImages" / "a.jpg").read_bytes()
    (root / "JPEGImages" / "a.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"a.jpg: unreadable or corrupt image"):
        read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)


def test_manifest_round_trip(tmp_path):
    root = make_root(tmp_path, {"a": mask_with(1), "b": mask_with(2)})
    dataset = read_voc(VocParams(root=str(root), val_fraction=0.5), progress=False)
    dataset.save(tmp_path / "out" / "dataset.json")
    loaded = Dataset.load(tmp_path / "out" / "dataset.json")
    assert loaded.labels == dataset.labels and loaded.splits == dataset.splits
    assert loaded.read_image("a").shape == (6, 8, 3)
    np.testing.assert_array_equal(loaded.read_mask("b"), mask_with(2))


def test_reads_voc12_mini_as_it_is(voc_mini):
    dataset = read_voc(VocParams(root=str(voc_mini)), seed=0, progress=False)
    assert len(dataset.ids("train")) + len(dataset.ids("val")) == 311
    assert len(dataset.ids("val")) == 62
    with open(voc_mini / "manifest.csv") as handle:
        expected = {row["id"]: sorted(VOC_CLASSES.index(n) for n in row["classes"].split()) for row in csv.DictReader(handle)}
    assert dataset.labels == expected
    seen = set().union(*map(set, dataset.labels.values()))
    assert seen == set(range(1, 21))
    image, mask = dataset.read_image("2007_000032"), dataset.read_mask("2007_000032")
    assert image.shape == (281, 500, 3) and mask.shape == (281, 500)
    assert set(np.unique(mask).tolist()) == {0, 1, 15, 255}
