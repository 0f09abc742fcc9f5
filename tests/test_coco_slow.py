"""Slow end-to-end: `data=coco` on a tiny COCO-format set (random boxes and triangles), through the whole DAG."""
import json

import numpy as np
import pytest

from tests.coco_set import expected_mask, write_random_set
from tests.pipeline import copy_repo, dvc, recompose
from tests.test_tags_slow import CHEAP, SCORED_STAGES
from wsss_core.data.dataset import Dataset


@pytest.mark.slow
def test_a_coco_format_set_runs_the_whole_dag(tmp_path):
    root, cache = tmp_path / "coco", tmp_path / "masks"
    write_random_set(root, n_train=24, n_val=8)
    repo = copy_repo(tmp_path / "repo", {})
    recompose(repo, "data=coco", f"data.coco.root={root}", f"data.coco.mask_cache={cache}", *CHEAP)
    dvc(repo, "repro")
    dataset = Dataset.load(repo / "data/prepared/dataset.json")
    assert dataset.class_names == ["background", "person", "car", "dog", "toothbrush"]
    assert (len(dataset.ids("train")), len(dataset.ids("val"))) == (24, 8)
    content = json.loads((root / "annotations/instances_val2014.json").read_text())
    first = content["images"][0]
    objects = [{"category": a["category_id"], "polygons": a["segmentation"]}
               for a in content["annotations"] if a["image_id"] == first["id"]]
    assert np.array_equal(dataset.read_mask(dataset.ids("val")[0]), expected_mask(first["height"], first["width"], objects))
    for name in SCORED_STAGES:
        report = json.loads((repo / f"metrics/{name}.json").read_text())
        assert 0 <= report["miou"] <= 1 and report["scored_images"] == (8 if name == "seg" else 24), name
        assert set(report["per_class"]) == set(dataset.class_names), name
    assert "up to date" in dvc(repo, "status").stdout
