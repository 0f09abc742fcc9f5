"""End-to-end: `dvc repro` on a tiny synthetic config in a temporary copy of the repo."""
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.pipeline import TINY_PARAMS, copy_repo, dvc, git, recompose
from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import read_label_png

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"), TINY_PARAMS)


def test_prepare_writes_voc_layout_and_manifest(tiny_repo):
    dvc(tiny_repo, "repro", "prepare")
    dataset = Dataset.load(tiny_repo / "data/prepared/dataset.json")
    assert len(dataset.ids("train")) == 16 and len(dataset.ids("val")) == 8
    assert dataset.class_names[0] == "background" and dataset.num_classes == 6
    root = tiny_repo / "data/prepared/synthetic"
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == dataset.ids("train")
    for image_id in dataset.ids("train")[:4]:
        image, mask = dataset.read_image(image_id), read_label_png(root / "SegmentationClass" / f"{image_id}.png")
        assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
        present = sorted(set(np.unique(mask).tolist()) - {0, 255})
        assert present == dataset.labels[image_id] and present
    assert "up to date" in dvc(tiny_repo, "status", "prepare").stdout  # cached: nothing to re-run


def test_repro_through_cam_evaluation(tiny_repo):
    dvc(tiny_repo, "repro", "eval_cams")
    dataset = Dataset.load(tiny_repo / "data/prepared/dataset.json")
    with h5py.File(tiny_repo / "cams/cams.h5", "r") as store:
        assert sorted(store.keys()) == sorted(dataset.ids("train"))
        assert json.loads(store.attrs["scales"]) == [1.0, 0.5] and store.attrs["method"] == "cam"
        for image_id in dataset.ids("train"):
            cam = store[image_id]["cam"]
            assert cam.dtype == np.float16 and cam.shape[1:] == (96, 96)
            assert cam.attrs["keys"].tolist() == dataset.labels[image_id]
            values = cam[()]
            assert values.min() >= 0 and values.max() <= 1
    report = json.loads((tiny_repo / "metrics/cam.json").read_text())
    assert 0 < report["miou"] <= 1 and set(report["per_class"]) == set(dataset.class_names)
    assert report["sweep"]["best_miou"] >= report["miou"]
    assert 0 <= report["synthetic_activation"]["part_mean"] <= 1
    assert 0 <= report["auc"] <= 1 and 0 <= report["classifier_map"] <= 1
    assert report["sweep"]["thresholds"][-1] == 0.95
    assert 0 < report["baselines"]["all_foreground"] < report["baselines"]["all_background"] < 1
    live = json.loads((tiny_repo / "dvclive/train_cls/metrics.json").read_text())
    assert live["step"] == 0 and 0 < live["val_map"] <= 1
    trained = json.loads((tiny_repo / "metrics/train_cls.json").read_text())
    assert trained == {"method": "cam", "epochs": 1, "warm_start_epochs": 0, "val_map": live["val_map"], "learned": {}}
    shown = dvc(tiny_repo, "metrics", "show", "--json").stdout
    assert "metrics/cam.json" in shown


def test_repro_through_pseudo_masks(tiny_repo):
    dvc(tiny_repo, "repro", "pseudo_masks")
    dataset = Dataset.load(tiny_repo / "data/prepared/dataset.json")
    ids = dataset.ids("train")
    refined = json.loads((tiny_repo / "metrics/cam_refined.json").read_text())  # cam passes through: same scores
    assert refined.pop("correlation_with_input") == pytest.approx(1.0)
    assert refined == json.loads((tiny_repo / "metrics/cam.json").read_text())
    assert (tiny_repo / "cams/cams_refined.h5").read_bytes() == (tiny_repo / "cams/cams.h5").read_bytes()
    for name in ("affinity_labels", "rw", "crf", "pseudo"):
        report = json.loads((tiny_repo / f"metrics/{name}.json").read_text())
        assert 0 < report["miou"] <= 1, name
        assert set(report["per_class"]) == set(dataset.class_names), name
    with h5py.File(tiny_repo / "cams/cams_rw.h5", "r") as store:
        assert sorted(store.keys()) == sorted(ids)
        group = store[ids[0]]
        assert group["background"].shape == group["cam"].shape[1:] == (96, 96)
        assert 0 <= group["cam"][()].min() and max(group["cam"][()].max(), group["background"][()].max()) == 1
    for folder in ("labels/affinity", "labels/crf", "labels/pseudo"):
        files = sorted(p.stem for p in (tiny_repo / folder).glob("*.png"))
        assert files == sorted(ids), folder
    pseudo = read_label_png(tiny_repo / "labels/pseudo" / f"{ids[0]}.png")
    assert pseudo.shape == (96, 96) and set(np.unique(pseudo)) <= {0, *dataset.labels[ids[0]]}
    assert "up to date" in dvc(tiny_repo, "status", "pseudo_masks").stdout


def test_whole_dag_caches_reruns_only_what_changed_and_runs_experiments(tiny_repo):
    dvc(tiny_repo, "repro")
    dataset = Dataset.load(tiny_repo / "data/prepared/dataset.json")
    report = json.loads((tiny_repo / "metrics/seg.json").read_text())
    assert 0 < report["miou"] <= 1 and 0 < report["pixel_accuracy"] <= 1
    onestep = json.loads((tiny_repo / "metrics/seg_onestep.json").read_text())
    assert onestep == {"miou": None, "per_class": {}, "skipped": "method 'cam' has no segmentation branch"}
    assert set(report["per_class"]) == set(dataset.class_names) and report["protocol"]["images"] == 8
    bars = json.loads((tiny_repo / "plots/seg_per_class.json").read_text())["per_class"]
    assert {bar["class"] for bar in bars} <= set(dataset.class_names) and bars
    for picture in ("plots/seg_confusion.png", "plots/seg_val.png"):
        assert Image.open(tiny_repo / picture).size[0] > 100, picture
    live = json.loads((tiny_repo / "dvclive/train_seg/metrics.json").read_text())
    assert 0 < live["val_miou"] <= 1 and live["loss"] > 0
    assert "Running stage" not in dvc(tiny_repo, "repro").stdout  # everything cached
    others = ("wsss_core/methods/agen.py", "wsss_core/models/agen.py", "wsss_core/data/synthetic.py")
    for path in others:  # another method's code and the generator: nothing of `cam` from the classifier on
        (tiny_repo / path).write_text((tiny_repo / path).read_text() + "# edited\n")
    assert set(json.loads(dvc(tiny_repo, "status", "--json").stdout)) == {"prepare", "eval_cams", "refine"}
    for path in others:
        (tiny_repo / path).write_text((tiny_repo / path).read_text().removesuffix("# edited\n"))
    first = dataset.ids("train")[0]
    for flags, tiles in (([], 7), (["--labels-only"], 5)):  # image, CAM, RW, CRF, pseudo, DeepLab, GT
        subprocess.run([sys.executable, "-m", "stages.cli", "masks", "show", first, "--out", "m.png", *flags],
                       cwd=tiny_repo, check=True, capture_output=True)
        assert Image.open(tiny_repo / "m.png").size == (tiles * 96 + (tiles - 1) * 4, 14 + 96)

    params_file = tiny_repo / "params.yaml"
    original = params_file.read_text()
    recompose(tiny_repo, "crf.iterations=2", "crf.bilateral_compat=30.0")
    stale = json.loads(dvc(tiny_repo, "status", "--json").stdout)
    assert "dcrf" in stale and set(stale) <= {"dcrf", "evaluate"}  # evaluate reads crf for eval_crf
    ran = re.findall(r"Running stage '(\w+)'", dvc(tiny_repo, "repro").stdout)
    assert ran[0] == "dcrf" and set(ran) <= {"dcrf", "pseudo_masks", "train_seg", "evaluate", "summary"}
    summary = json.loads((tiny_repo / "metrics/summary.json").read_text())
    assert summary["seg"] == round(json.loads((tiny_repo / "metrics/seg.json").read_text())["miou"], 4)
    params_file.write_text(original)

    git(tiny_repo, "add", "-A")
    git(tiny_repo, "commit", "-qm", "baseline run")
    dvc(tiny_repo, "exp", "run", "-S", "method=cam", "-S", "rw.beta=10")
    assert yaml.safe_load(params_file.read_text())["rw"]["beta"] == 10  # composed from conf/ with the override
    experiments = json.loads(dvc(tiny_repo, "exp", "show", "--json").stdout)
    assert experiments, "dvc exp show listed nothing"
    shown = json.dumps(experiments)
    for metrics_file in ("metrics/cam.json", "metrics/cam_refined.json", "metrics/rw.json", "metrics/crf.json",
                         "metrics/pseudo.json", "metrics/seg.json", "metrics/seg_onestep.json"):
        assert metrics_file in shown, metrics_file
    assert '"beta": 10' in shown.replace("10.0", "10")

    recompose(tiny_repo, "seg.eval_scales=[1.0,0.75]", "seg.eval_flip=true", "seg.eval_crf=true")  # MCTformer's protocol
    subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=tiny_repo, check=True, capture_output=True)
    protocol = json.loads((tiny_repo / "metrics/seg.json").read_text())["protocol"]
    assert protocol == {"split": "val", "images": 8, "scales": [1.0, 0.75], "flip": True, "crf": True}

    recompose(tiny_repo, "seg.rws.enabled=true", "seg.epochs=5", "seg.rws.threshold=0.99", "seg.rws.slice_size=48",
              "seg.rws.slice_stride=24", "seg.rws.cam_pixels=all", "seg.eval_rws_blend=true")  # RWS blended at test time
    for stage in ("train_seg", "evaluate"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tiny_repo, check=True, capture_output=True)
    seg = json.loads((tiny_repo / "metrics/seg.json").read_text())
    blended = seg["test_time_blend"]
    assert (tiny_repo / "rws/local.pt").is_file() and blended["threshold"] == 0.99 and blended["blended_inputs"] > 0
    assert 0 <= blended["miou"] <= 1 and set(blended["per_class"]) == set(seg["per_class"])


def test_pseudo_source_cam_skips_the_affinity_branch(tiny_repo):
    """With pseudo.source: cam, AffinityNet, the walk and the CRF write placeholders; nothing upstream re-runs."""
    recompose(tiny_repo, "pseudo.source=cam")
    ran = re.findall(r"Running stage '(\w+)'", dvc(tiny_repo, "repro").stdout)
    assert set(ran) <= {"affinity_labels", "train_affinity", "random_walk", "dcrf", "pseudo_masks", "train_seg",
                        "evaluate", "summary"} and "pseudo_masks" in ran
    for name in ("affinity_labels", "rw", "crf"):
        report = json.loads((tiny_repo / f"metrics/{name}.json").read_text())
        assert report["miou"] is None and "pseudo.source is 'cam'" in report["skipped"], name
    assert sorted(p.name for p in (tiny_repo / "labels/crf").iterdir()) == ["SKIPPED.txt"]
    with h5py.File(tiny_repo / "cams/cams_rw.h5", "r") as store:
        assert list(store.keys()) == [] and "nothing reads" in store.attrs["skipped"]
    pseudo = json.loads((tiny_repo / "metrics/pseudo.json").read_text())
    cam = json.loads((tiny_repo / "metrics/cam.json").read_text())
    assert pseudo["miou"] == pytest.approx(cam["miou"], abs=1e-6)  # the CAM seeds at the same threshold
    subprocess.run([sys.executable, "-m", "stages.cli", "masks", "show", Dataset.load(
        tiny_repo / "data/prepared/dataset.json").ids("train")[0], "--out", "m.png"], cwd=tiny_repo, check=True,
        capture_output=True)
    assert Image.open(tiny_repo / "m.png").size[0] == 5 * 96 + 4 * 4  # image, CAM, pseudo, DeepLab, GT


def test_multisa_experiment_exports_per_layer_cams_and_its_gates(tmp_path):
    repo = copy_repo(tmp_path / "repo", TINY_PARAMS)
    dvc(repo, "exp", "run", "-S", "method=multisa", "eval_cams")
    trained = json.loads((repo / "metrics/train_cls.json").read_text())
    live = json.loads((repo / "dvclive/train_cls/metrics.json").read_text())
    assert trained["method"] == "multisa" and set(trained["learned"]) == {"beta_sa1", "beta_sa2", "beta_sa3"}
    assert all(live[name] == value for name, value in trained["learned"].items())  # also logged per epoch
    assert any(value != 0 for value in trained["learned"].values())  # the gates trained
    with h5py.File(repo / "cams/cams.h5", "r") as store:
        assert store.attrs["method"] == "multisa" and int(store.attrs["stride"]) == 8
        group = next(iter(store.values()))
        assert sorted(group) == ["cam", "cam_sa1", "cam_sa2", "cam_sa3"]
        first = next(iter(store))
    assert 0 < json.loads((repo / "metrics/cam.json").read_text())["miou"] <= 1
    subprocess.run([sys.executable, "-m", "stages.cli", "cams", "show", first, "--map", "cam_sa1", "--map", "cam_sa3",
                    "--out", "layers.png"], cwd=repo, check=True, capture_output=True)
    assert Image.open(repo / "layers.png").size[1] == 2 * (14 + 96) + 4  # one row per map
