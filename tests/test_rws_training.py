"""RWS in the segmentation stage: the budget split, the blended forward, the augmentation of blend maps,
a whole tiny run with its report and `wsss rws show`, and the plain path left as it was."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from stages.cli import app
from tests.fixtures import make_dataset
from wsss_core.config import RwsParams, SegParams, TrainRecipe
from wsss_core.data.transforms import augment_with_labels, augment_with_maps
from wsss_core.errors import DataError
from wsss_core.models.deeplab import build_segmenter
from wsss_core.seg.rws_training import BlendSet, blended_forward, phase_steps, train_with_rws, write_rws_report
from wsss_core.training import EpochSeededSet, ParamGroup, fit


def test_phase_steps_split_the_budget_and_refuse_one_too_small():
    assert phase_steps(100, RwsParams()) == (45, 15, 40)
    assert phase_steps(100, RwsParams(rounds=2, local_iteration_fraction=0.1, retrain_iteration_fraction=0.2)) == (
        40, 10, 20)
    with pytest.raises(DataError, match="2 training steps leave none for the global network"):
        phase_steps(2, RwsParams())


def test_a_budget_that_leaves_nothing_for_the_global_network_is_a_params_error():
    with pytest.raises(ValueError, match=r"rounds x \(local_iteration_fraction \+ retrain_iteration_fraction\) = 1.1"):
        RwsParams(rounds=2, local_iteration_fraction=0.15, retrain_iteration_fraction=0.4)


class NoiseSet(EpochSeededSet):
    def __getitem__(self, index):
        rng = self.sample_rng(index)
        return torch.from_numpy(rng.normal(size=4).astype(np.float32)), torch.tensor(float(rng.normal()))


def train_linear(steps, epochs=2):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    reported = []

    def loss(batch):
        inputs, targets = batch
        return ((model(inputs)[:, 0] - targets) ** 2).mean(), {}

    fit(model, NoiseSet([str(i) for i in range(6)], 0), loss, recipe=TrainRecipe(epochs=epochs, batch_size=2, lr=0.1),
        device=torch.device("cpu"), seed=0, desc="test", groups=[ParamGroup("new", list(model.parameters()))],
        steps=steps, on_epoch_end=lambda epoch, means: reported.append(epoch))
    return model, reported


def test_fit_by_steps_equals_fit_by_epochs_and_stops_mid_epoch():
    by_epochs, epochs = train_linear(None)
    by_steps, _ = train_linear(6)  # 3 batches per epoch
    assert epochs == [1, 2] and torch.equal(by_epochs.weight, by_steps.weight)
    _, partial = train_linear(4)
    assert partial == [1, 2]


def test_augmenting_maps_draws_the_same_transform_as_the_labels_alone():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 5:25] = 1
    maps = np.stack([(labels == 1).astype(np.float32), np.zeros((40, 60), np.float32)])
    plain = augment_with_labels(image, labels, (50, 70), 48, np.random.default_rng(7))
    with_maps = augment_with_maps(image, labels, maps, (50, 70), 48, np.random.default_rng(7))
    np.testing.assert_array_equal(plain[0], with_maps[0])
    np.testing.assert_array_equal(plain[1], with_maps[1])
    inside, beta = with_maps[1] == 1, with_maps[2][0]
    assert with_maps[2].shape == (2, 48, 48) and (with_maps[2][1] == 0).all()
    assert ((beta > 0.5) == inside).mean() > 0.97  # the map moved with the labels (bilinear edges aside)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_segmenter("deeplabv3plus", "resnet18", 4, output_stride=16, channels=16).eval()


def test_blending_with_zero_strength_or_with_itself_leaves_the_output(segmenter):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = segmenter(images)
        strides = segmenter.stage_strides()
        assert strides == [4, 8, 16, 16]
        zero = blended_forward(segmenter, copy.deepcopy(segmenter), images, torch.zeros(2, 4, 64, 64), strides)
        itself = blended_forward(segmenter, copy.deepcopy(segmenter), images, torch.rand(2, 4, 64, 64), strides)
    assert torch.equal(zero, plain) and torch.allclose(itself, plain, atol=1e-5)


def test_full_strength_on_the_last_stage_feeds_the_local_network_features(segmenter):
    images = torch.randn(1, 3, 64, 64)
    local = copy.deepcopy(segmenter)
    for parameter in local.backbone.parameters():
        parameter.data.mul_(1.5)
    beta = torch.zeros(1, 4, 64, 64)
    beta[:, 3] = 1.0
    with torch.no_grad():
        blended = blended_forward(segmenter, local, images, beta, segmenter.stage_strides())
        expected_high = local.backbone.body.forward_intermediates(images, indices=[4], intermediates_only=True)[0]
        low = segmenter.backbone.body.forward_intermediates(images, indices=[1], intermediates_only=True)[0]
        context = torch.nn.functional.interpolate(segmenter.aspp(expected_high), size=low.shape[-2:],
                                                  mode="bilinear", align_corners=False)
        fused = segmenter.decoder(torch.cat([context, segmenter.low_project(low)], 1))
        expected = torch.nn.functional.interpolate(segmenter.classifier(fused), size=(64, 64), mode="bilinear",
                                                   align_corners=False)
    assert torch.allclose(blended, expected, atol=1e-5)


def tiny_recipe(**rws) -> SegParams:
    return SegParams(epochs=3, batch_size=2, crop_size=48, resize_long=[48, 64], decoder_channels=16,
                     pretrained="", rws=RwsParams(enabled=True, slice_size=32, slice_stride=16, threshold=0.99,
                                                  show_images=2, **rws))


def test_a_tiny_rws_run_finds_weak_slices_writes_its_report_and_draws_them(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path, sizes=((64, 72), (64, 72), (48, 56)))
    labels = dataset.root / "SegmentationClass"
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", "resnet18", 4, output_stride=16, channels=16)
    epochs = []
    rounds = train_with_rws(model, dataset, labels, tiny_recipe(), device=torch.device("cpu"), seed=0,
                            on_epoch_end=lambda epoch, means: epochs.append(epoch))
    assert epochs == [1, 2]  # one global and one retraining epoch of one step each (3 images, batch 2)
    found = rounds[0]
    assert found.threshold == 0.99 and found.windows > 0
    assert found.weak_slices and all(s.attention < 0.99 for s in found.weak_slices)
    assert set(found.seconds) == {"heatmaps", "local", "retrain"}
    write_rws_report(tmp_path / "rws", rounds, 12.5)
    report = json.loads((tmp_path / "rws/report.json").read_text())
    assert report["enabled"] and report["train_seconds"] == 12.5
    assert report["rounds"][0]["weak_slices"] == len(found.weak_slices)
    slices = json.loads((tmp_path / "rws/slices.json").read_text())["slices"]
    assert len(slices) == len(found.weak_slices) and all(len(s["box"]) == 4 for s in slices)
    shown = next(iter(found.shown))
    monkeypatch.chdir(tmp_path)
    dataset.save(tmp_path / "dataset.json")
    result = CliRunner().invoke(app, ["rws", "show", shown, "--rws", str(tmp_path / "rws"), "--dataset",
                                      str(tmp_path / "dataset.json"), "--out", str(tmp_path / "show.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "show.png").is_file()


def test_rws_off_writes_only_the_training_time(tmp_path):
    write_rws_report(tmp_path / "rws", None, 3.0, "seg.rws.enabled is false")
    assert sorted(p.name for p in (tmp_path / "rws").iterdir()) == ["report.json"]
    assert json.loads((tmp_path / "rws/report.json").read_text()) == {
        "enabled": False, "skipped": "seg.rws.enabled is false", "train_seconds": 3.0}
