"""The COCO reader (`data=coco`) on a tiny COCO-format set whose masks are rasterised by hand."""
import json

import numpy as np
import pytest

from tests.coco_set import CLASS_OF, expected_mask, inside, rectangle, uncompressed_rle, write_split
from wsss_core.data.coco import read_coco
from wsss_core.data.dataset import Dataset
from wsss_core.data.sources import CocoParams
from wsss_core.errors import DataError

W, H = 41, 33  # odd sizes
CROWD = np.zeros((H, W), dtype=bool)
CROWD[20:30, 3:15] = True
CROWD[0, 40] = True  # a run that touches the last column: RLE order is column-major
TRAIN = [
    # Overlap: the triangle comes later and wins where it covers the box.
    ("COCO_train2014_000000000001", W, H, [{"category": 1, "polygons": [rectangle(2, 3, 20, 18)]},
                                            {"category": 18, "polygons": [[10, 5, 30, 5, 10, 25]]}]),
    # One instance in two polygons, and a crowd region (RLE) under a later box: the box wins over the crowd.
    ("COCO_train2014_000000000002", W, H, [{"category": 90, "polygons": [rectangle(0, 0, 5, 5), rectangle(30, 20, 41, 33)]},
                                            {"category": 3, "region": CROWD, "iscrowd": 1},
                                            {"category": 18, "polygons": [rectangle(10, 22, 13, 26)]}]),
    ("COCO_train2014_000000000003", W, H, []),  # no annotation: not in the papers' lists
]
VAL = [("COCO_val2014_000000000004", W, H, [{"category": 3, "polygons": [rectangle(5, 5, 25, 25)]}]),
       ("COCO_val2014_000000000005", W, H, [{"category": 1, "region": CROWD, "iscrowd": 1}])]


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    write_split(root, "train2014", TRAIN)
    write_split(root, "val2014", VAL, seed=1)
    return root


def read(root, tmp_path, **section):
    return read_coco(CocoParams(root=str(root), mask_cache=str(tmp_path / "cache"), **section), workers=1)


def test_masks_equal_hand_rasterised_polygons_and_rle(coco_root, tmp_path):
    dataset = read(coco_root, tmp_path)
    for name, width, height, objects in TRAIN[:2] + VAL:
        assert np.array_equal(dataset.read_mask(name), expected_mask(height, width, objects)), name
    # Spot checks of the hand rule itself: a box covers [x0, x1) x [y0, y1); the crowd stays 255 under no box.
    first = dataset.read_mask(TRAIN[0][0])
    assert first[3, 2] == 1 and first[17, 2] == 1 and first[18, 2] == 0 and first[3, 1] == 0
    assert first[6, 12] == CLASS_OF[18]  # inside both: the later triangle
    second = dataset.read_mask(TRAIN[1][0])
    assert second[25, 5] == 255 and second[23, 11] == CLASS_OF[18] and second[0, 40] == 255
    assert second[32, 40] == CLASS_OF[90] and second[4, 4] == CLASS_OF[90]


def test_classes_in_category_id_order_and_labels_from_all_annotations(coco_root, tmp_path):
    dataset = read(coco_root, tmp_path)
    assert dataset.class_names == ["background", "person", "car", "dog", "toothbrush"]
    assert dataset.ids("train") == [TRAIN[0][0], TRAIN[1][0]]  # the unannotated image is left out
    assert dataset.labels[TRAIN[0][0]] == [1, 3]
    assert dataset.labels[TRAIN[1][0]] == [2, 3, 4]  # the crowd's car counts as a label
    assert dataset.labels[VAL[1][0]] == [1]
    assert dataset.image_path(VAL[0][0]) == coco_root / "val2014" / f"{VAL[0][0]}.jpg"


def test_unlabelled_images_kept_on_request_with_an_all_background_mask(coco_root, tmp_path):
    dataset = read(coco_root, tmp_path, keep_unlabelled=True)
    assert dataset.ids("train")[-1] == TRAIN[2][0] and dataset.labels[TRAIN[2][0]] == []
    assert not dataset.read_mask(TRAIN[2][0]).any()


@pytest.mark.parametrize("crowd, value", [("class", None), ("background", 0)])
def test_crowd_rules(coco_root, tmp_path, crowd, value):
    mask = read(coco_root, tmp_path, crowd=crowd).read_mask(VAL[1][0])
    assert np.array_equal(mask, expected_mask(H, W, VAL[1][3], crowd_value=value))
    assert set(np.unique(mask)) == ({0, CLASS_OF[1]} if crowd == "class" else {0})


def test_masks_are_cached_per_annotation_content_and_rule(coco_root, tmp_path):
    dataset = read(coco_root, tmp_path)
    mask_file = dataset.mask_path(TRAIN[0][0])
    assert mask_file.parent.parent == tmp_path / "cache"
    stamp = mask_file.stat().st_mtime_ns
    again = read(coco_root, tmp_path)
    assert again.mask_path(TRAIN[0][0]) == mask_file and mask_file.stat().st_mtime_ns == stamp  # not rewritten
    assert read(coco_root, tmp_path, crowd="class").mask_path(TRAIN[0][0]).parent != mask_file.parent
    annotations = coco_root / "annotations" / "instances_train2014.json"
    content = json.loads(annotations.read_text())
    content["annotations"][0]["segmentation"] = [rectangle(0, 0, 3, 3)]
    annotations.write_text(json.dumps(content))
    changed = read(coco_root, tmp_path)
    assert changed.mask_path(TRAIN[0][0]).parent != mask_file.parent
    assert changed.read_mask(TRAIN[0][0])[1, 1] == 1 and changed.read_mask(TRAIN[0][0])[10, 5] == 0


def test_manifest_round_trip_keeps_image_folders_and_mask_cache(coco_root, tmp_path):
    dataset = read(coco_root, tmp_path)
    manifest = tmp_path / "prepared" / "dataset.json"
    dataset.save(manifest)
    loaded = Dataset.load(manifest)
    assert loaded.image_path(VAL[0][0]).resolve() == dataset.image_path(VAL[0][0]).resolve()
    assert np.array_equal(loaded.read_mask(VAL[0][0]), dataset.read_mask(VAL[0][0]))
    assert loaded.scored_ids(loaded.ids("val")) == [VAL[0][0], VAL[1][0]]
    assert loaded.read_image(TRAIN[0][0]).shape == (H, W, 3)


def test_id_lists_restrict_the_splits(coco_root, tmp_path):
    (coco_root / "val_ids.txt").write_text(f"{VAL[1][0]}\n")
    assert read(coco_root, tmp_path, val_list="val_ids.txt").ids("val") == [VAL[1][0]]
    (coco_root / "bad_ids.txt").write_text(f"{TRAIN[2][0]}\n")  # unlabelled, so not an image of the split
    with pytest.raises(DataError, match="bad_ids.txt: id 'COCO_train2014_000000000003' is not a labelled image"):
        read(coco_root, tmp_path, train_list="bad_ids.txt")


def edit_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["images"][0].update(width=40), r"000000000001.jpg: image is 41x33, its annotation file says 40x33"),
    (lambda c: c["annotations"][0].update(category_id=2), r"instances_train2014.json: annotations\[0\] has category 2"),
    (lambda c: c["annotations"][0].update(image_id=99), r"annotations\[0\] names image 99, which is not listed"),
    (lambda c: c["categories"].append({"id": 91, "name": "extra"}), r"instances_val2014.json: its categories differ"),
    (lambda c: c["images"][0].update(file_name="../x.jpg"), r"image 1: file name '\.\./x.jpg' is not a plain name"),
    (lambda c: c.pop("categories"), r"instances_train2014.json: a COCO instance file needs the lists"),
    # malformed records: one line naming the file, the list and the record, never a traceback
    (lambda c: c["images"][0].update(id=[1]), r"images\[0\]: id must be an integer and file_name a string"),
    (lambda c: c["images"][1].update(id=c["images"][0]["id"]), r"images\[1\]: image id 1 is also listed earlier"),
    (lambda c: c["images"][0].update(height="abc"), r"images\[0\]: height and width must be positive integers, "
                                                    r"got 'abc' and 41"),
    (lambda c: c["images"][0].update(height=0), r"images\[0\]: height and width must be positive integers"),
    (lambda c: c["images"][0].update(height=100_000, width=100_000), r"images\[0\]: 100000x100000 is more than "
                                                                      r"data.max_pixels"),
    (lambda c: c["categories"][0].update(id="18"), r"categories\[0\]: id must be an integer and name a string"),
    (lambda c: c["annotations"][0].update(image_id="1"), r"annotations\[0\]: image_id and category_id must be "
                                                         r"integers"),
    (lambda c: c["annotations"][0].update(category_id=[18]), r"annotations\[0\]: image_id and category_id"),
    (lambda c: c["categories"].extend({"id": 100 + n, "name": f"c{n}"} for n in range(255)),
     r"instances_train2014.json: 259 categories, at most 254 fit a label map"),
    (lambda c: c["annotations"][0].update(iscrowd=2), r"annotations\[0\]: iscrowd must be 0 or 1, got 2"),
    (lambda c: c["annotations"][0].update(segmentation=None), r"annotations\[0\]: segmentation must be polygons or "
                                                              r"an RLE object \{size, counts\}, got NoneType"),
    (lambda c: c["annotations"][0].update(segmentation="abc"), r"annotations\[0\]: segmentation must be polygons"),
    (lambda c: c["annotations"][0].update(segmentation=[]), r"annotations\[0\]: segmentation must be a non-empty "
                                                            r"list of polygons"),
    (lambda c: c["annotations"][0].update(segmentation=[[1, 2]]), r"annotations\[0\]: polygon 0 has 2 numbers"),
    (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), r"polygon 0 has 7 numbers"),
    (lambda c: c["annotations"][0]["segmentation"][0].__setitem__(0, float("nan")),
     r"annotations\[0\]: polygon 0 holds a value that is not a finite number"),
    (lambda c: c["annotations"][0]["segmentation"][0].__setitem__(0, 1e12),
     r"annotations\[0\]: polygon 0 reaches beyond the 41x33 image"),
    (lambda c: c["annotations"][0].update(segmentation=[[0, 0, 1, 0, 1, 1] * 40_000]),
     r"annotations\[0\]: more than 200000 polygon coordinates"),
    (lambda c: c["annotations"][0].update(segmentation={"size": [100_000, 100_000], "counts": "abc"}),
     r"annotations\[0\]: RLE size \[100000, 100000\] differs from the image's \[33, 41\]"),
    (lambda c: c["annotations"][0].update(segmentation={"size": [33, 41], "counts": [-5, 1358]}),
     r"annotations\[0\]: RLE counts must be non-negative integers summing to 1353"),
    (lambda c: c["annotations"][0].update(segmentation={"size": [33, 41], "counts": 7}),
     r"annotations\[0\]: RLE counts must be a list of integers or a compressed string"),
])
def test_bad_annotations_are_one_line_errors(coco_root, tmp_path, change, message):
    edit_json(coco_root / "annotations" / "instances_train2014.json", change)
    with pytest.raises(DataError, match=message):
        read(coco_root, tmp_path)


def test_unreadable_annotation_files_are_one_line_errors(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2014.json"
    text = path.read_text()
    path.write_text(text.replace('"images":', '"categories": [], "images":', 1))  # a key twice in one object
    with pytest.raises(DataError, match="instances_train2014.json: key 'categories' appears twice"):
        read(coco_root, tmp_path)
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match="instances_train2014.json: UTF-16 text"):
        read(coco_root, tmp_path)
    path.write_text(text)
    with pytest.raises(DataError, match=r"instances_train2014.json: \d+ bytes, more than the 100 allowed"):
        read(coco_root, tmp_path, max_annotation_bytes=100)


def test_an_image_in_both_splits_names_both_places(coco_root, tmp_path):
    val = coco_root / "annotations" / "instances_val2014.json"
    content = json.loads(val.read_text())
    train = json.loads((coco_root / "annotations" / "instances_train2014.json").read_text())
    content["images"][0]["file_name"] = train["images"][0]["file_name"]
    val.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"instances_val2014.json: image \d+: id 'COCO_train2014_000000000001' is "
                                        r"listed twice \(also as train2014/COCO_train2014_000000000001.jpg\)"):
        read(coco_root, tmp_path)


def test_missing_annotation_file_and_missing_image(coco_root, tmp_path):
    (coco_root / "val2014" / f"{VAL[0][0]}.jpg").unlink()
    with pytest.raises(DataError, match=f"{VAL[0][0]}.jpg"):
        read(coco_root, tmp_path)
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances_val2014.json: annotation file not found"):
        read(coco_root, tmp_path)


def test_hand_rasteriser_and_rle_encoder_are_right():
    """The test's own tools: a 2x2 box covers exactly 4 pixels; the RLE of a known region is its runs."""
    assert inside(rectangle(1, 1, 3, 3), 4, 4).sum() == 4
    region = np.array([[1, 0], [1, 1]], dtype=bool)  # column-major: 1, 1, 0, 1
    assert uncompressed_rle(region) == {"size": [2, 2], "counts": [0, 2, 1, 1]}


def test_a_huge_rle_or_image_size_fails_with_its_message_under_a_2_gb_address_space(coco_root, tmp_path):
    """Bounds are checked before allocation: under RLIMIT_AS = 2 GB, sizes that would ask for 9.3 GiB give the
    one-line message, not a MemoryError."""
    import subprocess
    import sys

    edit_json(coco_root / "annotations" / "instances_train2014.json", lambda c: c["annotations"][0].update(
        segmentation={"size": [100_000, 100_000], "counts": [0, 10 ** 10]}))
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from wsss_core.data.coco import read_coco\nfrom wsss_core.data.sources import CocoParams\nfrom wsss_core.errors import DataError\n"
              "try:\n    read_coco(CocoParams(root=sys.argv[1], mask_cache=sys.argv[2]), workers=1)\n"
              "except DataError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script, str(coco_root), str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "annotations[0]: RLE size [100000, 100000] differs from the image's [33, 41]" in result.stdout


def test_an_annotation_file_past_the_parse_bound_fails_with_its_message_under_a_2_gb_address_space(coco_root,
                                                                                                 tmp_path):
    """120 MB of empty lists would take about 2.6 GB of Python objects to parse: under RLIMIT_AS = 2 GB and
    max_parse_bytes = 1 GiB, read_coco refuses it in one line before decoding (with the bound at 1 TiB the same run
    ends in a MemoryError, so the test can fail)."""
    import subprocess
    import sys

    (coco_root / "annotations" / "instances_train2014.json").write_bytes(b"[" + b"[]," * 40_000_000 + b"[]]")
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
              "from wsss_core.data.coco import read_coco\nfrom wsss_core.data.sources import CocoParams\nfrom wsss_core.data.files import ReadLimits\n"
              "from wsss_core.errors import DataError\ntry:\n"
              "    read_coco(CocoParams(root=sys.argv[1], mask_cache=sys.argv[2]),\n"
              "              ReadLimits(max_parse_bytes=int(sys.argv[3])), workers=1)\n"
              "except DataError as err:\n    print(err)\n")

    def read_under_limit(max_parse_bytes: int):
        return subprocess.run([sys.executable, "-c", script, str(coco_root), str(tmp_path / "cache"),
                               str(max_parse_bytes)], capture_output=True, text=True, timeout=300)

    result = read_under_limit(2**30)
    assert result.returncode == 0, result.stderr
    # 2 x 120,000,004 bytes (text, contents) + 40 x 40,000,000 commas + 100 x 40,000,002 brackets + 4096
    assert ("instances_train2014.json: parsing it would take about 5,840,004,304 bytes of memory, more than the 1,073,741,824 allowed "
            "(data.max_parse_bytes)") in result.stdout
    assert "MemoryError" in read_under_limit(2**40).stderr


@pytest.mark.parametrize("change, message", [
    (lambda c: c["images"][0].update(height="abc"), "images[0]: height and width must be positive integers"),
    (lambda c: c["annotations"][0].update(segmentation=None), "annotations[0]: segmentation must be polygons"),
    (lambda c: c["annotations"][0]["segmentation"][0].__setitem__(1, float("nan")), "holds a value that is not a"),
    (lambda c: c["annotations"][0].update(segmentation={"size": [100_000, 100_000], "counts": "x"}), "RLE size"),
])
def test_malformed_coco_through_prepare_is_one_line_and_leaves_nothing(coco_root, tmp_path, monkeypatch, change,
                                                                        message):
    from tests.test_bad_inputs import assert_empty, assert_one_line_error, run, write_params

    edit_json(coco_root / "annotations" / "instances_train2014.json", change)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"name": "coco", "coco": {"root": "coco", "mask_cache": "masks"}}})
    assert_one_line_error(run("prepare"), message)
    assert_empty(tmp_path / "data")
    assert not list(tmp_path.glob("masks/**/*.tmp"))
