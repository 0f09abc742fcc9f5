"""Bad and edge-case inputs, as a new user would give them: one table, one line of error each.

Every case runs a real entrypoint in-process in a fresh working folder and checks: exit status 2,
exactly one `error:` line on stderr holding the expected fragment, no traceback, and that the
stage left nothing under a final or temporary name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from stages import (affinity_labels, dcrf, eval_cams, export_cams, inspect_cams, predict, prepare, pseudo_masks,
                    refine, train_cls)
from stages._common import load_params
from tests.pipeline import deep_merge
from wsss_core.cams.store import CamStoreWriter
from wsss_core.checkpoint import read_checkpoint, save_checkpoint
from wsss_core.config import Params
from wsss_core.data.dataset import Dataset
from wsss_core.data.label_dir import LabelDirWriter
from wsss_core.data.palette import write_label_png
from wsss_core.errors import DataError
from wsss_core.models.deeplab import build_segmenter

SMALL = {"data": {"synthetic": {"n_train": 6, "n_val": 2, "image_size": 64, "num_classes": 5}},
         "cls": {"epochs": 1, "batch_size": 4, "crop_size": 48, "resize_long": [48, 64]}}
STAGES = {"prepare": prepare.app, "train_cls": train_cls.app, "export_cams": export_cams.app,
          "eval_cams": eval_cams.app, "refine": refine.app, "affinity_labels": affinity_labels.app,
          "dcrf": dcrf.app, "pseudo_masks": pseudo_masks.app, "predict": predict.app, "cams": inspect_cams.app}


def write_params(folder: Path, override: dict | None = None, raw: str = "") -> None:
    """params.yaml = the defaults with SMALL and `override` merged in, plus raw YAML text appended."""
    params = deep_merge(deep_merge(Params().model_dump(), SMALL), override or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False) + raw)


def run(command: str, *args: str):
    return CliRunner().invoke(STAGES[command], list(args))


def assert_one_line_error(result, fragment: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def assert_empty(folder: Path) -> None:
    """No file or folder under `folder` (which may not exist at all)."""
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.rglob("*"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    return tmp_path


@pytest.fixture
def prepared(workdir):
    assert run("prepare").exit_code == 0
    return Dataset.load(workdir / "data/prepared/dataset.json")


def make_voc(folder: Path, ids: list[str], size=(8, 6)) -> Path:
    """A VOC root with a small image and mask per id; `train.txt` lists `ids` as given."""
    root = folder / "voc"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for image_id in {i for i in ids if "/" not in i}:
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[0] = 1
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    return root


# ---- params: (override or raw YAML, stage, expected fragment) --------------------------------------------
PARAM_CASES = [
    ({"cams": {"scales": [0.0]}}, "export_cams", "cams.scales.0: Input should be greater than 0"),
    ({"cams": {"scales": [-1.0]}}, "export_cams", "cams.scales.0: Input should be greater than 0"),
    ({"cams": {"scales": []}}, "export_cams", "cams.scales: List should have at least 1 item"),
    ({"cams": {"sweep": [0.1, 0.5, 0.0]}}, "eval_cams", "cams.sweep: need 0 < start <= stop < 1 and step > 0"),
    ({"cams": {"sweep": [0.1, 0.5]}}, "eval_cams", "cams.sweep: give [start, stop, step], got 2 numbers"),
    ({"seed": -1}, "train_cls", "seed: Input should be greater than or equal to 0"),
    ({"data": {"seed": -1}}, "prepare", "data.seed: Input should be greater than or equal to 0"),
    ({"seed": 4294967296}, "train_cls", "seed: Input should be less than or equal to 4294967295"),
    ({"cls": {"num_workers": -1}}, "train_cls", "cls.num_workers: Input should be greater than or equal to 0"),
    ({"cls": {"resize_long": []}}, "train_cls", "cls.resize_long: List should have at least 2 items"),
    ({"cls": {"resize_long": [0, 0]}}, "train_cls", "cls.resize_long.0: Input should be greater than or equal to 1"),
    ({"cls": {"resize_long": [256, 160]}}, "train_cls", "cls.resize_long: give [shortest, longest]"),
    ({"cls": {"lr": -0.01}}, "train_cls", "cls.lr: Input should be greater than 0"),
    ({"cls": {"lr": "0.01"}}, "train_cls", "cls.lr: Input should be a valid number, got '0.01' (YAML read it as text"),
    ({"seg": {"eval_scales": []}}, "train_cls", "seg.eval_scales: List should have at least 1 item"),
    ({"seg": {"eval_scales": [0.0]}}, "train_cls", "seg.eval_scales.0: Input should be greater than 0"),
    ({"device": "tpu"}, "train_cls", "device: Input should be 'auto', 'cpu' or 'cuda'"),
    ({"data": {"max_pixels": 0}}, "prepare", "data.max_pixels: Input should be greater than or equal to 1"),
    ({"data": {"synthetic": {"n_val": 0}}}, "prepare", "data.synthetic.n_val: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("override, stage, fragment", PARAM_CASES, ids=[c[2].split(":")[0] + f"-{i}" for i, c in
                                                                         enumerate(PARAM_CASES)])
def test_bad_param_is_one_line_and_writes_nothing(workdir, override, stage, fragment):
    write_params(workdir, override)
    assert_one_line_error(run(stage), fragment)
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


def test_exponent_without_dot_reads_as_a_number(workdir):
    """PyYAML reads `1e-3` as text (YAML 1.1); DVC reads it as a number, and so do we."""
    write_params(workdir)
    text = (workdir / "params.yaml").read_text().replace("  lr: 0.01\n", "  lr: 1e-3\n", 1)
    (workdir / "params.yaml").write_text(text)
    assert load_params(workdir / "params.yaml").cls.lr == 0.001


# ---- data: a VOC root with a bad list --------------------------------------------------------------------
DATA_CASES = [
    (["a", "../../x", "b"], {}, "train.txt:2: image id '../../x' is not a plain name"),
    (["a", "/abs/x", "b"], {}, "train.txt:2: image id '/abs/x' is not a plain name"),
    (["a", "b", "a"], {}, "train.txt:3: id 'a' is listed twice (first on line 1)"),
    (["a"], {}, "leaves the val split empty"),
    (["a"], {"val_fraction": 0.9}, "leaves the train split empty"),
]


@pytest.mark.parametrize("ids, voc, fragment", DATA_CASES, ids=[f"data-{i}" for i in range(len(DATA_CASES))])
def test_bad_list_file_fails_prepare_and_leaves_nothing(workdir, ids, voc, fragment):
    root = make_voc(workdir, ids)
    write_params(workdir, {"data": {"name": "voc", "voc": {"root": str(root), **voc}}})
    assert_one_line_error(run("prepare"), fragment)
    assert_empty(workdir / "data")  # neither data/prepared nor data/prepared.tmp


def test_too_large_image_is_refused_by_prepare(workdir):
    root = make_voc(workdir, ["a", "b", "c"], size=(80, 60))
    write_params(workdir, {"data": {"name": "voc", "max_pixels": 4000, "voc": {"root": str(root)}}})
    assert_one_line_error(run("prepare"), "a.jpg: 80x60 image has 4,800 pixels, over the limit of 4,000")
    assert_empty(workdir / "data")


def test_decompression_bomb_is_refused(workdir):
    """A 12000 x 12000 PNG (a few hundred KB on disk) is refused before a pixel is decoded."""
    root = make_voc(workdir, ["a", "b", "c"])
    Image.new("L", (12000, 12000)).save(root / "JPEGImages" / "b.jpg", format="PNG")
    write_params(workdir, {"data": {"name": "voc", "max_pixels": 10**9, "voc": {"root": str(root)}}})
    assert_one_line_error(run("prepare"), "b.jpg: refused as a possible decompression bomb")
    assert_empty(workdir / "data")


# ---- stores that do not cover the split --------------------------------------------------------------------
def write_store(path: Path, dataset: Dataset, ids: list[str], background: bool = False) -> None:
    with CamStoreWriter(path, {"method": "cam", "class_names": dataset.class_names, "stride": 4}) as writer:
        for image_id in ids:
            keys = np.asarray(dataset.labels[image_id])
            cam = np.random.default_rng(0).random((len(keys), 64, 64), np.float32)
            writer.write(image_id, cam, keys, {"background": cam[0] * 0 + 0.5} if background else None)


@pytest.mark.parametrize("stage, store, source", [
    ("eval_cams", "cams/cams.h5", "crf"), ("refine", "cams/cams.h5", "crf"),
    ("affinity_labels", "cams/cams_refined.h5", "crf"), ("dcrf", "cams/cams_rw.h5", "crf"),
    ("pseudo_masks", "cams/cams_refined.h5", "cam"), ("pseudo_masks", "cams/cams_rw.h5", "rw")])
def test_store_missing_an_image_is_refused(prepared, stage, store, source):
    write_params(Path.cwd(), {"pseudo": {"source": source}})
    ids = prepared.ids("train")
    for name in ("cams/cams.h5", "cams/cams_refined.h5", "cams/cams_rw.h5"):
        write_store(Path(name), prepared, ids[1:], background=True)
    assert_one_line_error(run(stage), f"{store}: 1 of the {len(ids)} train images are missing (e.g. '{ids[0]}')")
    assert not Path("metrics").exists() and not any(Path("labels").glob("*"))
    assert not Path("cams/cams_refined.h5.tmp").exists()


def test_store_refuses_a_group_name_that_nests(tmp_path):
    with pytest.raises(DataError, match=r"image id '\.\./x' is not a plain name"):
        with CamStoreWriter(tmp_path / "s.h5", {}) as writer:
            writer.write("../x", np.zeros((1, 4, 4)), np.array([1]))
    assert list(tmp_path.iterdir()) == []


def test_cams_ls_on_a_foreign_group_is_one_line(workdir):
    with h5py.File("foreign.h5", "w") as handle:
        handle.attrs.update(method="cam", scales="[1.0]", stride=16, class_names='["background", "a"]')
        handle.create_group("img").create_dataset("other", data=np.zeros(3))
    assert_one_line_error(run("cams", "ls", "--store", "foreign.h5"), "'img' is not a CAM group")


# ---- checkpoints: nothing runs from a file ------------------------------------------------------------------
class RunsCodeOnLoad:
    """Unpickling this creates the file `marker`: proof that loading ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_checkpoint_is_refused_and_runs_nothing(workdir):
    marker = workdir / "code_ran"
    torch.save({"model": {}, "payload": RunsCodeOnLoad(str(marker))}, workdir / "evil.pt")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(workdir / "x.png")
    result = run("predict", "x.png", "--model", "evil.pt", "--out", "out")
    assert_one_line_error(result, "evil.pt: refused: this checkpoint holds pickled objects")
    assert not marker.exists() and not (workdir / "out").exists()


def test_our_checkpoints_load_with_weights_only(tmp_path):
    model = torch.nn.Conv2d(3, 2, 1)
    save_checkpoint(tmp_path / "c.pt", model, "cam", {"cls": Params().cls.model_dump()}, class_names=["bg", "a"])
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["params"]["cls"] == Params().cls.model_dump() and loaded["class_names"] == ["bg", "a"]
    assert torch.equal(read_checkpoint(tmp_path / "c.pt")["model"]["weight"], model.weight)


# ---- predict --------------------------------------------------------------------------------------------------
@pytest.fixture
def seg_model(workdir) -> Path:
    network = build_segmenter("deeplabv3plus", "resnet18", 3, output_stride=16)
    settings = {"arch": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16}
    save_checkpoint(workdir / "seg.pt", network, "cam", {"seg": settings}, class_names=["background", "a", "b"])
    return workdir / "seg.pt"


@pytest.mark.parametrize("args, fragment", [
    (["--scale", "0"], "--scale must be positive, got 0.0"),
    (["--device", "tpu"], "device 'tpu' is not one of: auto, cpu, cuda"),
    (["--out", "afile"], "--out afile: is a file, not a folder"),
    (["--out", "afile/sub"], "--out afile/sub: cannot create the folder"),
    (["--max-pixels", "0"], "--max-pixels must be positive, got 0"),
])
def test_predict_bad_option_fails_before_any_output(workdir, seg_model, args, fragment):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(workdir / "x.png")
    (workdir / "afile").write_text("")
    result = run("predict", "x.png", "--model", str(seg_model), *args)
    assert_one_line_error(result, fragment)
    assert not (workdir / "predictions").exists()


def test_predict_keeps_going_past_a_bad_image_and_fails_at_the_end(workdir, seg_model):
    images = workdir / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 12, 3), np.uint8)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "huge.png")
    result = run("predict", str(images), "--model", str(seg_model), "--out", "out", "--max-pixels", "1000")
    assert_one_line_error(result, "2 of 3 images could not be read (see above)")
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2 and "broken.jpg: unreadable or corrupt image" in skipped[0]
    assert "huge.png: 40x40 image has 1,600 pixels, over the limit of 1,000" in skipped[1]
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["good.png", "good_overlay.jpg"]
    assert Image.open(workdir / "out/good.png").size == (12, 16)


# ---- leftovers after a failure or a kill ------------------------------------------------------------------------
def test_failed_training_keeps_the_previous_curves(prepared):
    previous = Path("dvclive/train_cls")
    previous.mkdir(parents=True)
    (previous / "metrics.json").write_text('{"val_map": 0.5}')
    for image_id in prepared.ids("train"):  # training fails in its first batch
        os.remove(prepared.image_path(image_id))
    assert_one_line_error(run("train_cls"), "image not found")
    assert json.loads((previous / "metrics.json").read_text()) == {"val_map": 0.5}
    assert sorted(p.name for p in previous.iterdir()) == ["metrics.json"]
    assert not Path("dvclive/train_cls.tmp").exists() and not Path("models").exists()


def test_stale_temporaries_are_removed_by_the_next_run(workdir):
    for stale in ("data/prepared.tmp/junk", "data/prepared/old.json"):
        Path(stale).parent.mkdir(parents=True, exist_ok=True)
        Path(stale).write_text("left by a killed run")
    assert run("prepare").exit_code == 0
    assert not Path("data/prepared.tmp").exists() and not Path("data/prepared/old.json").exists()
    assert Path("data/prepared/dataset.json").is_file()


def test_writers_remove_what_a_killed_run_left(prepared):
    """A kill -9 leaves `x.tmp`; the next writer of `x` removes it and writes `x` whole."""
    Path("cams").mkdir()
    Path("cams/cams.h5.tmp").write_bytes(b"half an HDF5 file")
    Path("labels/crf.tmp").mkdir(parents=True)
    Path("labels/crf.tmp/half.png").write_bytes(b"")
    ids = prepared.ids("train")
    write_store(Path("cams/cams.h5"), prepared, ids)
    with LabelDirWriter(Path("labels/crf"), prepared) as writer:
        for image_id in ids:
            writer.write(image_id, prepared.read_mask(image_id))
    assert sorted(p.name for p in Path("cams").iterdir()) == ["cams.h5"]
    assert sorted(p.name for p in Path("labels").iterdir()) == ["crf"]
    assert sorted(p.stem for p in Path("labels/crf").iterdir()) == sorted(ids)
