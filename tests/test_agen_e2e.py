"""End-to-end: `dvc exp run -S method=agen` on a tiny synthetic set (a width-1/16 VGG-16 + ResNet-38d AGEN):
the affinity and CRF stages write placeholders, branch B's masks feed DeepLab, evaluate scores both, and a
second `dvc repro` finds everything cached."""
import json

import h5py
import pytest

from tests.pipeline import TINY_PARAMS, copy_repo, dvc

pytestmark = pytest.mark.e2e

TINY_AGEN = ["method=agen", "cls.backbone=vgg16", "cls.pretrained=''", "seg.pretrained=''",
             "methods.agen.model.width=0.0625", "methods.agen.model.cls_head_channels=16",
             "methods.agen.model.agm_cls_channels=8", "methods.agen.model.agm_seg_channels=8",
             "methods.agen.model.seg_head_channels=8", "methods.agen.model.seg_head_dilation=2",
             "methods.agen.model.crf.workers=1"]


@pytest.fixture(scope="module")
def agen_repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("agen"), TINY_PARAMS)
    overrides = [*TINY_AGEN, "methods.agen.model.warm_start_epochs=1"]
    dvc(repo, "exp", "run", *[arg for override in overrides for arg in ("-S", override)])
    return repo


def read(repo, name):
    return json.loads((repo / name).read_text())


def test_agen_runs_the_dag_with_placeholders_and_scores_both_steps(agen_repo):
    for name in ("rw", "crf"):
        report = read(agen_repo, f"metrics/{name}.json")
        assert report["miou"] is None and "pseudo.source is 'export'" in report["skipped"]
    onestep, twostep = read(agen_repo, "metrics/seg_onestep.json"), read(agen_repo, "metrics/seg.json")
    assert 0 <= onestep["miou"] <= 1 and onestep["protocol"]["images"] == 8 and 0 <= twostep["miou"] <= 1
    assert 0 < read(agen_repo, "metrics/cam.json")["miou"] <= 1  # branch A's CAMs are scored like any method's
    with h5py.File(agen_repo / "cams/cams.h5", "r") as store:
        group = store[next(iter(store))]
        assert group["seg"].shape[0] == group["cam"].shape[0] + 1  # background + the image's classes
    live = read(agen_repo, "dvclive/train_cls/metrics.json")
    assert {"cls_top", "cls_agm3", "seed_top", "seed_agm5", "boundary", "crf_ms", "lambda_coam3"} <= set(live)
    trained = read(agen_repo, "metrics/train_cls.json")
    assert set(trained["learned"]) == {"lambda_coam3", "lambda_coam4", "lambda_coam5"}
    assert (trained["epochs"], trained["warm_start_epochs"]) == (1, 1)
    assert live["step"] == 1  # dvclive's steps number the epochs through both phases (0-based)


def test_a_second_repro_finds_every_stage_cached(agen_repo):
    assert "Running stage" not in dvc(agen_repo, "repro").stdout
    assert json.loads(dvc(agen_repo, "status", "--json").stdout) == {}
