"""Slow end-to-end: the voc12-mini preset (`data=voc12-mini`, cpu profile) on a few real photos through pseudo_masks."""
import json

import h5py
import pytest

from tests.pipeline import copy_repo, dvc, recompose
from wsss_core.data.dataset import Dataset


@pytest.mark.slow
def test_voc12_mini_preset_runs_through_pseudo_masks(tmp_path, voc_mini):
    root = tmp_path / "voc"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    for name in ("JPEGImages", "SegmentationClass"):
        (root / name).symlink_to(voc_mini / name)
    ids = (voc_mini / "ImageSets/Segmentation/train.txt").read_text().split()[:15]
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    repo = copy_repo(tmp_path / "repo", {})
    # the folders are links into voc12-mini (never copied): data.follow_links admits links that leave the root
    recompose(repo, "data=voc12-mini", f"data.voc.root={root}", "data.follow_links=true", "cls.epochs=1",
              "affinity.epochs=1", "cams.scales=[1.0]")
    dvc(repo, "repro", "eval_cams")
    dvc(repo, "repro", "pseudo_masks")
    dataset = Dataset.load(repo / "data/prepared/dataset.json")
    assert len(dataset.ids("train")) == 12 and dataset.num_classes == 20
    for name in ("cam", "cam_refined", "affinity_labels", "rw", "crf", "pseudo"):
        report = json.loads((repo / f"metrics/{name}.json").read_text())
        assert 0 < report["miou"] <= 1, name
    pseudo = json.loads((repo / "metrics/pseudo.json").read_text())
    assert 0 <= pseudo["void_as_background"]["miou"] <= 1 and 0 < pseudo["coverage"] <= 1
    with h5py.File(repo / "cams/cams_rw.h5", "r") as store:
        assert sorted(store) == sorted(dataset.ids("train"))
        rw = json.loads(store.attrs["params"])
    assert rw["affinity"]["dilated"] is False and rw["affinity"]["freeze_backbone"] is False
