"""End-to-end: a second method (the test-only `toy`) added as a contributor would, run through DVC."""
import json
import re
import subprocess

import h5py
import pytest
import yaml

from tests.conftest import REPO
from tests.pipeline import TINY_PARAMS, copy_repo, dvc, git, recompose

pytestmark = pytest.mark.e2e

TOY_SECTION = {"model": {"width": 8}, "export": {}, "refine": {"power": 1.0}}


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    """A repo copy with the test-only `toy` method installed as a contributor would add one: its module and its
    config file, no other file edited (the registry imports every module of wsss_core/methods/)."""
    repo = copy_repo(tmp_path_factory.mktemp("toy"), TINY_PARAMS)
    source = (REPO / "tests/toy_method.py").read_text()
    (repo / "wsss_core/methods/toy.py").write_text(source + "\n\nregister_method(ToyMethod)\n")
    (repo / "wsss_core/methods/toy.py").write_text(
        (repo / "wsss_core/methods/toy.py").read_text().replace(
            "from wsss_core.methods.base import Method,", "from wsss_core.methods.base import register_method, Method,"))
    (repo / "conf/method/toy.yaml").write_text("# @package _global_\nmethod: toy\n" + yaml.safe_dump(
        {"methods": {"toy": TOY_SECTION},  # its section: not in conf/config.yaml, which holds the shipped ones
         "method_code": {"module": "wsss_core/methods/toy.py", "base_module": "wsss_core/methods/toy.py"}}))
    touched = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, check=True,
                             capture_output=True, text=True).stdout.split("\n")
    assert sorted(line[3:] for line in touched if line) == ["conf/method/toy.yaml", "wsss_core/methods/toy.py"]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "add the toy method")
    return repo


def test_a_second_method_plugs_in_and_a_refine_sweep_reruns_only_refine_onwards(toy_repo):
    dvc(toy_repo, "exp", "run", "-S", "method=toy", "-S", "pseudo.source=export")
    params = yaml.safe_load((toy_repo / "params.yaml").read_text())
    assert params["method"] == "toy" and params["methods"]["toy"] == TOY_SECTION
    with h5py.File(toy_repo / "cams/cams.h5", "r") as store:
        group = store[next(iter(store))]
        assert json.loads(store.attrs["raw"]) == ["stride_cam"]
        assert group["stride_cam"].attrs["layout"] == "views,classes,height,width"
        assert group["stride_cam"].shape[:2] == (2, 6)  # two views (flip), all 6 classes, at the CAM stride
        assert group["seg"].shape[0] == group["cam"].shape[0] + 1
    refined = json.loads((toy_repo / "metrics/cam_refined.json").read_text())
    assert 0 < refined["miou"] <= 1 and refined != json.loads((toy_repo / "metrics/cam.json").read_text())
    live = json.loads((toy_repo / "dvclive/train_cls/metrics.json").read_text())
    assert {"loss", "classification", "sparsity", "val_map"} <= set(live)  # the loss parts reach dvclive
    onestep = json.loads((toy_repo / "metrics/seg_onestep.json").read_text())
    assert 0 < onestep["miou"] <= 1 and onestep["protocol"]["images"] == 8
    assert json.loads((toy_repo / "metrics/rw.json").read_text())["miou"] is None  # export: no walk needed

    toy_module = toy_repo / "wsss_core/methods/toy.py"
    toy_module.write_text(toy_module.read_text() + "# edited\n")  # its own code is a dep of its stages
    assert {"train_cls", "export_cams"} <= set(json.loads(dvc(toy_repo, "status", "--json").stdout))
    toy_module.write_text(toy_module.read_text().removesuffix("# edited\n"))

    recompose(toy_repo, "method=toy", "pseudo.source=export", "methods.toy.refine.power=2.0")
    stale = set(json.loads(dvc(toy_repo, "status", "--json").stdout))
    assert "refine" in stale and not stale & {"prepare", "train_cls", "export_cams", "eval_cams"}
    ran = re.findall(r"Running stage '(\w+)'", dvc(toy_repo, "exp", "run", "-S", "method=toy", "-S",
                                                    "pseudo.source=export", "-S", "methods.toy.refine.power=2").stdout)
    assert ran[0] == "refine" and not set(ran) & {"prepare", "train_cls", "export_cams", "eval_cams"}
    swept = json.loads((toy_repo / "metrics/cam_refined.json").read_text())
    assert swept["miou"] != refined["miou"]
