"""`data=tags`: your own images with image-level tags, any class list, optional masks (wsss_core/data/tags.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import write_label_png
from wsss_core.data.sources import TagsParams
from wsss_core.data.tags import read_tags
from wsss_core.errors import DataError


def make_tags_root(tmp_path, rows="id,labels\na,cat;dog\nb,dog\nc,background\nd,fish tree\n", files=None,
                   masks=(), classes=None, labels_name="labels.csv"):
    """A tags root: images a..d (PNG for d), the labels file, optional classes.txt and masks."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, suffix in (files or {"a": ".jpg", "b": ".jpg", "c": ".jpeg", "d": ".png"}).items():
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}{suffix}")
    (root / labels_name).write_text(rows if isinstance(rows, str) else json.dumps(rows))
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    for image_id in masks:
        mask = np.zeros((30, 40), np.uint8)
        mask[5:15, 5:20] = 1
        mask[-1] = 255
        write_label_png(root / "masks" / f"{image_id}.png", mask)
    return root


def test_classes_come_in_first_seen_order_and_the_background_marker_means_no_class(tmp_path):
    dataset = read_tags(TagsParams(root=str(make_tags_root(tmp_path)), val_fraction=0.25), progress=False)
    assert dataset.class_names == ["background", "cat", "dog", "fish", "tree"]
    assert dataset.labels == {"a": [1, 2], "b": [2], "c": [], "d": [3, 4]}
    assert sorted(dataset.ids("train") + dataset.ids("val")) == ["a", "b", "c", "d"] and len(dataset.ids("val")) == 1
    assert dataset.image_path("d").name == "d.png" and dataset.read_image("c").shape == (30, 40, 3)


def test_a_class_file_sets_the_order_and_classes_no_image_shows(tmp_path):
    names = [f"class{n}" for n in range(25)]
    root = make_tags_root(tmp_path, rows="a,class24\nb,class3 class0\nc,class3\nd,background\n",
                          classes="\n".join(names) + "\n")
    dataset = read_tags(TagsParams(root=str(root), val_fraction=0.25), progress=False)
    assert dataset.num_classes == 25 and dataset.labels["a"] == [25] and dataset.labels["b"] == [1, 4]


def test_json_labels_masks_for_some_images_and_the_manifest_round_trip(tmp_path):
    root = make_tags_root(tmp_path, rows={"a": ["cat"], "b": ["dog", "cat"], "c": ["background"], "d": ["dog"]},
                          labels_name="labels.json", masks=("a", "b"))
    (root / "val.txt").write_text("b\nd\n")
    dataset = read_tags(TagsParams(root=str(root), labels="labels.json", val_list="val.txt"), progress=False)
    assert dataset.splits == {"train": ["a", "c"], "val": ["b", "d"]}
    assert [dataset.has_mask(i) for i in "abcd"] == [True, True, False, False]
    assert dataset.scored_ids(["a", "b", "c", "d"]) == ["a", "b"]
    dataset.save(tmp_path / "prepared" / "dataset.json")
    loaded = Dataset.load(tmp_path / "prepared" / "dataset.json")
    assert loaded.images == dataset.images and loaded.read_mask("a")[10, 10] == 1
    assert loaded.masked == {"a", "b"}
    (root / "masks" / "a.png").rename(root / "masks" / "c.png")  # the manifest, not the folder, says who is scored
    assert [loaded.has_mask(i) for i in "abcd"] == [True, True, False, False]
    dataset.save(tmp_path / "again.json")
    assert Dataset.load(tmp_path / "again.json").masked == {"b", "c"}  # a new manifest records the change


BAD_INPUTS = [  # (rows, classes, files, masks, message)
    ("a,cat\nb,unicorn\nc,cat\nd,cat\n", "cat\n", None, (), "image 'b' has class 'unicorn', which is not in"),
    ("a,cat\nb,\nc,cat\nd,cat\n", None, None, (), "image 'b' has no tag (write 'background'"),
    ("a,cat\nb,dog\na,dog\nd,cat\n", None, None, (), "labels.csv:3: image id 'a' is listed twice"),
    ("a,cat\n../escape,dog\n", None, None, (), "image id '../escape' is not a plain name"),
    ("a,cat\nb,dog\nc,cat\nd,cat\ne,cat\n", None, None, (), "no image for id 'e'"),
    ("a,cat\nb,dog\nc,cat\nd,cat\n", None, {"a": ".jpg", "b": ".jpg", "c": ".jpg", "d": ".png", "x": ".jpg"}, (),
     None),
    ("a,cat\nb,dog\nc,cat\nd,cat\n", "background\ncat\n", None, (), "'background' is implicit (class 0)"),
    ("a,cat,dog\n", None, None, (), "labels.csv:1: expected `id,labels`, got 3 fields"),
    ("a,background\nb,background\n", None, None, (), "no class name besides 'background'"),
]


@pytest.mark.parametrize("rows, classes, files, masks, message", BAD_INPUTS)
def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, rows, classes, files, masks, message):
    root = make_tags_root(tmp_path, rows=rows, classes=classes, files=files, masks=masks)
    if message is None:  # an extra image without tags is fine: only listed ids are read
        dataset = read_tags(TagsParams(root=str(root), val_fraction=0.25), progress=False)
        assert sorted(dataset.labels) == ["a", "b", "c", "d"]
        return
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as err:
        read_tags(TagsParams(root=str(root), val_fraction=0.25), progress=False)
    assert "\n" not in str(err.value) and str(root) in str(err.value)


def test_two_images_for_one_id_and_a_mask_of_another_size_are_refused(tmp_path):
    root = make_tags_root(tmp_path, rows="a,cat\nb,dog\nc,cat\nd,cat\n", masks=("a",))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "images" / "a.png")
    with pytest.raises(DataError, match="id 'a' has several images"):
        read_tags(TagsParams(root=str(root), val_fraction=0.25), progress=False)
    (root / "images" / "a.png").unlink()
    write_label_png(root / "masks" / "b.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="b.png: mask size 10x10 differs from its image 40x30"):
        read_tags(TagsParams(root=str(root), val_fraction=0.25), progress=False)


def test_a_manifest_cannot_point_an_image_outside_the_root(tmp_path):
    dataset = read_tags(TagsParams(root=str(make_tags_root(tmp_path)), val_fraction=0.25), progress=False)
    dataset.images["a"] = "../../etc/passwd"
    dataset.save(tmp_path / "dataset.json")
    with pytest.raises(DataError, match="is not images/<id>.jpg|jpeg|png"):
        Dataset.load(tmp_path / "dataset.json")


class FakeStore:
    """store.read(id) -> (CAM [1, 30, 40] peaking at the mask's object, keys [1])."""

    def read(self, image_id, name="cam"):
        cam = np.zeros((1, 30, 40), np.float32)
        cam[0, 5:15, 5:20] = 1.0
        return cam, np.array([1])


def test_scores_cover_the_images_with_masks_and_are_null_without_any(tmp_path):
    from wsss_core.cams.evaluate import cam_metrics, describe_report
    from wsss_core.data.label_dir import LabelDirWriter
    from wsss_core.metrics import describe_miou

    tagged = read_tags(TagsParams(root=str(make_tags_root(tmp_path / "none")), val_fraction=0.25), progress=False)
    report = cam_metrics(FakeStore(), tagged, ["a", "b"], seed_bg_threshold=0.15, sweep=[0.1, 0.2, 0.1])
    assert report["miou"] is None and report["scored_images"] == 0 and report["sweep"] == {
        "skipped": "no ground-truth masks"}
    assert describe_report("CAM", report) == "CAM: not scored (no ground-truth masks)"
    some = read_tags(TagsParams(root=str(make_tags_root(tmp_path / "some", masks=("a",))), val_fraction=0.25),
                     progress=False)
    report = cam_metrics(FakeStore(), some, ["a", "b"], seed_bg_threshold=0.15, sweep=[0.1, 0.2, 0.1])
    assert report["scored_images"] == 1 and report["miou"] == pytest.approx(1.0)  # a's CAM is its mask
    for dataset, expected in ((tagged, None), (some, 1.0)):
        with LabelDirWriter(tmp_path / f"labels_{expected}", dataset) as writer:
            for image_id in ("a", "b"):
                labels = np.zeros((30, 40), np.uint8)
                labels[5:15, 5:20] = 1
                writer.write(image_id, labels)
        written = writer.report()
        assert written["miou"] == (None if expected is None else pytest.approx(expected))
        assert written["scored_images"] == (0 if expected is None else 1)
        assert describe_miou(written).startswith("not scored" if expected is None else "mIoU 1.0000, coverage")
        assert sorted(p.name for p in (tmp_path / f"labels_{expected}").iterdir()) == ["a.png", "b.png"]


def test_the_palette_gives_every_class_up_to_254_its_own_colour():
    from wsss_core.data.palette import VOC_PALETTE
    assert len({tuple(colour) for colour in VOC_PALETTE[:255]}) == 255
