"""Malformed tag-only inputs through the real `prepare` entry point: one line naming the file, no traceback, no
data/prepared or temporary left behind (wsss_core/data/files.py, wsss_core/data/tags.py)."""
from __future__ import annotations

import codecs
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.test_bad_inputs import assert_empty, assert_one_line_error, run, write_params
from tests.test_tags import make_tags_root


def tags_params(tmp_path, **data):
    write_params(tmp_path, {"data": {"name": "tags", "tags": {"root": "mine", **data.pop("tags", {})}, **data}})


def labels_bytes(root, data: bytes, name="labels.csv"):
    (root / name).write_bytes(data)


CASES = {
    # id: (how to break the root, tags params, expected fragment of the one error line)
    "csv in UTF-16": (lambda r: labels_bytes(r, "a,cat\nb,dog\n".encode("utf-16")), {},
                      "labels.csv: UTF-16 text; save it as UTF-8"),
    "csv in Latin-1": (lambda r: labels_bytes(r, "a,chat\u00e9\nb,dog\n".encode("latin-1")), {},
                       "labels.csv: not UTF-8 text (byte 6 is b'\\xe9')"),
    "classes in UTF-16": (lambda r: (r / "classes.txt").write_bytes("cat\ndog\n".encode("utf-16")), {},
                          "classes.txt: UTF-16 text"),
    "json labels not UTF-8": (lambda r: labels_bytes(r, b'{"a": ["caf\xe9"]}', "labels.json"),
                              {"labels": "labels.json"}, "labels.json: not UTF-8 text"),
    "csv field over the csv limit": (lambda r: labels_bytes(r, b"a,cat\nb,\"" + b"x" * 200_000 + b"\"\n"), {},
                                     "labels.csv:2: not a CSV row (field larger than field limit"),
    "csv with a NUL byte": (lambda r: labels_bytes(r, b"a,cat\nb,d\x00og\n"), {},
                            "labels.csv: image 'b' has the tag 'd\\x00og', which holds a control character"),
    "class list with a control character": (lambda r: (r / "classes.txt").write_bytes(b"cat\ndo\x1bg\n"), {},
                                            "classes.txt:2: class 'do\\x1bg' holds a control character"),
    "deeply nested json": (lambda r: labels_bytes(r, b"[" * 100_000 + b"]" * 100_000, "labels.json"),
                           {"labels": "labels.json"}, "labels.json: JSON nested too deeply"),
    "json with a repeated id": (lambda r: labels_bytes(r, b'{"a": ["cat"], "b": ["dog"], "a": ["dog"]}',
                                                       "labels.json"),
                                {"labels": "labels.json"}, "labels.json: key 'a' appears twice in one JSON object"),
    "json id mapped to a string": (lambda r: labels_bytes(r, b'{"a": "cat", "b": ["dog"]}', "labels.json"),
                                   {"labels": "labels.json"}, "labels.json: image 'a' must map to a list of class "
                                                              "names, got str"),
    "json list at the top": (lambda r: labels_bytes(r, b'[["a", "cat"]]', "labels.json"), {"labels": "labels.json"},
                             "labels.json: must map each image id to a list of class names"),
    "json huge number": (lambda r: labels_bytes(r, b'{"a": [' + b"9" * 5000 + b']}', "labels.json"),
                         {"labels": "labels.json"}, "labels.json: not valid JSON"),
    "id longer than a file name": (lambda r: labels_bytes(r, b"a,cat\n" + b"x" * 300 + b",dog\n"), {},
                                   "is 300 characters long (at most 200)"),
    "id listed twice in csv": (lambda r: labels_bytes(r, b"a,cat\nb,dog\na,dog\n"), {},
                               "labels.csv:3: image id 'a' is listed twice (first on line 1)"),
    "labels larger than the bound": (lambda r: labels_bytes(r, b"a,cat\nb,dog\n" + b"\n" * 5000), {},
                                     "more than the 4096 allowed (data.max_text_bytes)"),
    "json labels past the parse bound": (lambda r: labels_bytes(r, b'{"a": [' + b"[]," * 1000 + b'[]]}', "labels.json"),
                                         {"labels": "labels.json"},
                                         "labels.json: parsing it would take about 150,638 bytes of memory, more "
                                         "than the 100,000 allowed (data.max_parse_bytes)"),
    "val list in UTF-16": (lambda r: (r / "val.txt").write_bytes("a\n".encode("utf-16")),
                           {"val_list": "val.txt"}, "val.txt: UTF-16 text"),
    "more classes than a label map holds": (lambda r: (r / "classes.txt").write_text(
        "".join(f"c{n}\n" for n in range(255)) + "cat\ndog\nfish\ntree\n"), {}, "classes.txt: 259 classes, at most 254"),
    "decompression-bomb mask": (lambda r: bomb_mask(r), {}, "masks/a.png"),
    "image linked from outside the root": (lambda r: link_outside(r, "images/a.jpg"), {},
                                           "images/a.jpg: leads outside the data root"),
    "labels file linked from outside": (lambda r: link_outside(r, "labels.csv"), {},
                                        "labels.csv: leads outside the data root"),
    "mask linked from outside": (lambda r: link_outside(r, "masks/a.png"), {}, "masks/a.png: leads outside the data"),
}
# data params a case needs besides its tags params
DATA_PARAMS = {"labels larger than the bound": {"max_text_bytes": 4096},
               "json labels past the parse bound": {"max_parse_bytes": 100_000}}


def bomb_mask(root):
    """A mask whose header claims far more pixels than Pillow's decompression-bomb limit allows."""
    (root / "masks").mkdir(exist_ok=True)
    Image.new("L", (30, 40)).save(root / "masks/a.png")
    data = bytearray((root / "masks/a.png").read_bytes())
    data[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR width and height
    (root / "masks/a.png").write_bytes(bytes(data))


def link_outside(root, name):
    """Replace root/name by a link to a copy of it outside the root."""
    source = root / name
    outside = root.parent / f"outside-{source.name}"
    if source.exists():
        outside.write_bytes(source.read_bytes())
    else:
        Image.new("L", (40, 30)).save(outside)
        source.parent.mkdir(exist_ok=True)
    source.unlink(missing_ok=True)
    os.symlink(outside, source)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_tags_input_is_one_line_naming_the_file(tmp_path, monkeypatch, case):
    breaker, tags, fragment = CASES[case]
    make_tags_root(tmp_path, masks=("b",))
    breaker(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    tags_params(tmp_path, tags=tags, **DATA_PARAMS.get(case, {}))
    assert_one_line_error(run("prepare"), fragment)
    assert_empty(tmp_path / "data")


def test_links_inside_the_root_are_read_and_follow_links_admits_the_others(tmp_path, monkeypatch):
    root = make_tags_root(tmp_path)
    (root / "shared").mkdir()
    os.replace(root / "images/a.jpg", root / "shared/a.jpg")
    os.symlink(root / "shared/a.jpg", root / "images/a.jpg")
    monkeypatch.chdir(tmp_path)
    tags_params(tmp_path)
    assert run("prepare").exit_code == 0
    link_outside(root, "images/b.jpg")
    assert_one_line_error(run("prepare"), "images/b.jpg: leads outside the data root")
    tags_params(tmp_path, follow_links=True)
    result = run("prepare")
    assert result.exit_code == 0, result.output


def test_utf8_with_a_byte_order_mark_is_read(tmp_path, monkeypatch):
    root = make_tags_root(tmp_path)
    labels_bytes(root, codecs.BOM_UTF8 + b"id,labels\na,cat\nb,dog\nc,background\nd,dog\n")
    (root / "classes.txt").write_bytes(codecs.BOM_UTF8 + b"cat\ndog\n")
    monkeypatch.chdir(tmp_path)
    tags_params(tmp_path)
    result = run("prepare")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data/prepared/dataset.json").read_text())
    assert manifest["class_names"] == ["background", "cat", "dog"]
    assert np.array_equal(sorted(manifest["labels"]), ["a", "b", "c", "d"])


JSON_SHAPES = {
    "small ints": "[" + ",".join("0" for _ in range(20_000)) + "]",
    "floats": "[" + ",".join("0.5" for _ in range(20_000)) + "]",
    "empty lists": "[" + ",".join("[]" for _ in range(20_000)) + "]",
    "empty objects": "[" + ",".join("{}" for _ in range(20_000)) + "]",
    "one-key objects": "[" + ",".join('{"a":1}' for _ in range(10_000)) + "]",
    "unique strings": "[" + ",".join(f'"{n}"' for n in range(10_000)) + "]",
    "one large object": "{" + ",".join(f'"{n}":0' for n in range(10_000)) + "}",
    "non-ASCII strings": "[" + ",".join('"\u00e9\u4e2d"' for _ in range(10_000)) + "]",
    "COCO-like records": json.dumps([{"id": n, "image_id": n % 50, "bbox": [1.0, 2.0, 3.0, 4.0],
                                      "segmentation": [[n * 0.25 + k for k in range(40)]]} for n in range(1000)]),
}


@pytest.mark.parametrize("shape", sorted(JSON_SHAPES))
def test_the_json_memory_estimate_is_never_under_the_measured_parse(tmp_path, shape):
    """json_memory_estimate bounds what read_json allocates (text and objects, tracemalloc's peak) and stays
    within 15x of it on every shape (about 2x on COCO-like records)."""
    import tracemalloc

    from wsss_core.data.files import json_memory_estimate, read_json

    path = tmp_path / "shape.json"
    path.write_text(JSON_SHAPES[shape], encoding="utf-8")
    tracemalloc.start()
    parsed = read_json(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert parsed == json.loads(JSON_SHAPES[shape])
    estimate = json_memory_estimate(path.read_bytes())
    assert peak <= estimate <= 15 * peak
    if shape == "COCO-like records":
        assert estimate <= 3 * peak
