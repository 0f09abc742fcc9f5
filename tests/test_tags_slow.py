"""Slow end-to-end: a tag-only set (`data=tags`) made from 40 voc12-mini photos, through the whole DAG.

The VOC classes are renamed and listed in reverse order, with a 21st class no image shows, so nothing can
lean on VOC's names or indices. First with every mask withheld (each score is null with its reason), then
with masks for 10 images (those are scored, and the reports count them).
"""
import json

import numpy as np
import pytest
from PIL import Image

from tests.pipeline import copy_repo, dvc, recompose
from wsss_core.data.dataset import Dataset
from wsss_core.data.sources import VocParams
from wsss_core.data.voc import read_voc

PHOTOS = 40
NEVER_SHOWN = "never_shown"
SCORED_STAGES = ("cam", "cam_refined", "affinity_labels", "rw", "crf", "pseudo", "seg")
CHEAP = ("cls.epochs=1", "cls.crop_size=128", "cls.resize_long=[128,192]", "cams.scales=[1.0]",
         "affinity.epochs=1", "affinity.crop_size=128", "affinity.resize_long=[128,192]",
         "seg.epochs=1", "seg.crop_size=128", "seg.resize_long=[128,192]")


def renamed(voc_class: int) -> str:
    """VOC class c (1..20) is called k<c>; classes.txt lists them from k20 down, so k<c> gets index 21 - c."""
    return f"k{voc_class:02d}"


def write_tag_set(voc_mini, root):
    """Write root/images (links to the photos), labels.csv and classes.txt; return the VOC Dataset used."""
    voc = read_voc(VocParams(root=str(voc_mini)), progress=False)
    ids = sorted(voc.ids("train"))[:PHOTOS]
    (root / "images").mkdir(parents=True)
    for image_id in ids:
        (root / "images" / f"{image_id}.jpg").symlink_to(voc.image_path(image_id))
    rows = [f"{image_id},{';'.join(renamed(c) for c in voc.labels[image_id])}" for image_id in ids]
    (root / "labels.csv").write_text("id,labels\n" + "\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join([*(renamed(c) for c in range(20, 0, -1)), NEVER_SHOWN]) + "\n")
    return voc, ids


def write_renamed_mask(voc, image_id, path):
    """Write the image's VOC mask with class c as 21 - c (0 and 255 kept), as a greyscale PNG."""
    mask = np.array(Image.open(voc.mask_path(image_id)))
    remapped = np.where((mask > 0) & (mask < 255), 21 - mask.astype(np.int16), mask).astype(np.uint8)
    Image.fromarray(remapped, mode="L").save(path)


def reports(repo):
    return {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in SCORED_STAGES}


@pytest.mark.slow
def test_a_tag_only_set_runs_the_whole_dag_and_scores_only_the_images_with_masks(tmp_path, voc_mini):
    root = tmp_path / "tags"
    voc, ids = write_tag_set(voc_mini, root)
    repo = copy_repo(tmp_path / "repo", {})
    # the photos are links into voc12-mini (never copied): data.follow_links admits links that leave the root
    recompose(repo, "data=tags", f"data.tags.root={root}", "data.follow_links=true", *CHEAP)
    dvc(repo, "repro")
    dataset = Dataset.load(repo / "data/prepared/dataset.json")
    assert dataset.class_names[1] == "k20" and dataset.class_names[-1] == NEVER_SHOWN and dataset.num_classes == 21
    assert sorted(dataset.ids("train") + dataset.ids("val")) == ids
    assert not any(dataset.has_mask(image_id) for image_id in ids)
    for name, report in reports(repo).items():
        assert report["miou"] is None and report["scored_images"] == 0, name
        assert report["reason"] == "no ground-truth masks", name
    assert json.loads((repo / "metrics/cam.json").read_text())["sweep"] == {"skipped": "no ground-truth masks"}
    assert "up to date" in dvc(repo, "status").stdout

    with_masks = dataset.ids("train")[:5] + dataset.ids("val")[:5]
    (root / "masks").mkdir()
    for image_id in with_masks:
        write_renamed_mask(voc, image_id, root / "masks" / f"{image_id}.png")
    dvc(repo, "repro")
    for name, report in reports(repo).items():
        assert report["scored_images"] == 5, name  # 5 train ids for the pseudo-mask stages, 5 val for seg
        assert 0 <= report["miou"] <= 1, name
        assert NEVER_SHOWN in report["per_class"] and "k20" in report["per_class"], name
    assert "up to date" in dvc(repo, "status").stdout
