"""RWS in the segmentation stage: the budget split, the blended forward, the augmentation of blend maps,
a whole tiny run with its report and `wsss rws show`, and the plain path left as it was."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from stages.cli import app
from tests.fixtures import make_dataset
from wsss_core.config import RwsParams, SegParams, TrainRecipe
from wsss_core.data.transforms import augment_with_labels, augment_with_maps, joint_crop, resize_long_side
from wsss_core.errors import DataError
from wsss_core.models.deeplab import build_segmenter
from wsss_core.seg import rws_training
from wsss_core.seg.rws import select_weak_slices, sliding_windows, window_scores
from wsss_core.seg.rws_blend import RwsBlendedSegmenter, blended_forward, heatmaps, image_blend
from wsss_core.seg.rws_training import phase_steps, train_with_rws, write_rws_report
from wsss_core.models.groups import ParamGroup
from wsss_core.training import EpochSeededSet, fit


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


def reference_augment(image, labels, resize_long, crop_size, rng):
    """augment_with_labels as it was before maps joined it: rescale, flip, joint crop."""
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    image = resize_long_side(image, long_side)
    labels = resize_long_side(labels, long_side, resample=Image.NEAREST)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return joint_crop(image, labels, crop_size, rng)


def test_augmenting_maps_draws_the_same_transform_as_the_labels_alone():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 5:25] = 1
    maps = np.stack([(labels == 1).astype(np.float32), np.zeros((40, 60), np.float32)])
    for seed in range(20):
        reference = reference_augment(image, labels, (50, 70), 48, np.random.default_rng(seed))
        plain = augment_with_labels(image, labels, (50, 70), 48, np.random.default_rng(seed))
        with_maps = augment_with_maps(image, labels, maps, (50, 70), 48, np.random.default_rng(seed))
        for expected, got, other in zip(reference, plain, with_maps):
            np.testing.assert_array_equal(expected, got)
            np.testing.assert_array_equal(expected, other)
        inside, beta = with_maps[1] == 1, with_maps[2][0]
        assert with_maps[2].shape == (2, 48, 48) and (with_maps[2][1] == 0).all()
        assert ((beta > 0.5) == inside).mean() > 0.97  # the map moved with the labels (bilinear edges aside)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_segmenter("deeplabv3plus", "resnet18", 4, output_stride=16, channels=16).eval()


def test_blending_with_zero_strength_or_with_itself_leaves_the_output(segmenter):
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        plain = segmenter(images)
        strides = segmenter.stage_strides()
        assert strides == [4, 8, 16, 16]
        zero = blended_forward(segmenter, copy.deepcopy(segmenter), images, torch.zeros(2, 4, 64, 80), strides)
        itself = blended_forward(segmenter, copy.deepcopy(segmenter), images, torch.rand(2, 4, 64, 80), strides)
    assert torch.equal(zero, plain) and torch.allclose(itself, plain, atol=1e-5)


def scaled_copy(segmenter):
    """A local network that differs from the global one: its backbone's weights times 1.5."""
    local = copy.deepcopy(segmenter)
    for parameter in local.backbone.parameters():
        parameter.data.mul_(1.5)
    return local


def test_a_blended_middle_stage_mixes_the_local_features_per_stride_block(segmenter):
    torch.manual_seed(3)
    images = torch.randn(1, 3, 64, 80)
    local = scaled_copy(segmenter)
    beta = torch.zeros(1, 4, 64, 80)
    beta[0, 1, :24, 40:] = torch.rand(24, 40)  # stage 2 (stride 8): a varying strength in the top right
    modules = segmenter.stage_modules()
    with torch.no_grad():
        blended = blended_forward(segmenter, local, images, beta, segmenter.stage_strides())
        captured = {}
        hook = local.stage_modules()[1].register_forward_hook(lambda m, i, o: captured.setdefault("local", o))
        local(images)
        hook.remove()
        strength = torch.nn.functional.avg_pool2d(beta[:, 1:2], 8)  # [1, 1, 8, 10]
        mix = modules[1].register_forward_hook(lambda m, i, o: (1 - strength) * o + strength * captured["local"])
        expected = segmenter(images)
        mix.remove()
    assert torch.allclose(blended, expected, atol=1e-5) and not torch.allclose(blended, segmenter(images))


def tiny_recipe(**rws) -> SegParams:
    return SegParams(epochs=3, batch_size=2, crop_size=48, resize_long=[48, 64], decoder_channels=16,
                     pretrained="", rws=RwsParams(enabled=True, slice_size=32, slice_stride=16, threshold=0.99,
                                                  show_images=2, cam_pixels="all", **rws))


def tiny_run(tmp_path, recipe, model_out=None):
    dataset = make_dataset(tmp_path, sizes=((64, 72), (64, 72), (48, 56)))
    torch.manual_seed(0)
    model = build_segmenter("deeplabv3plus", "resnet18", 4, output_stride=16, channels=16)
    epochs = []
    rounds = train_with_rws(model, dataset, dataset.root / "SegmentationClass", recipe, device=torch.device("cpu"),
                            seed=0, on_epoch_end=lambda epoch, means: epochs.append(epoch))
    if model_out is not None:
        model_out.append(model)
    return dataset, rounds, epochs


def test_rws_beta_zero_keeps_every_phase_and_batch_and_never_blends(tmp_path, monkeypatch):
    """The switch-off control: beta 0 trains exactly as RWS would with each blended forward replaced by a plain
    one (same slices, steps and data order), and differs from beta 1."""
    runs = {}
    for name, beta, plain in (("control", 0.0, False), ("plain-forward", 1.0, True), ("rws", 1.0, False)):
        with monkeypatch.context() as patch:
            if plain:
                patch.setattr(rws_training, "blended_forward", lambda model, local, images, beta, strides: model(images))
            models = []
            _, rounds, epochs = tiny_run(tmp_path / name, tiny_recipe(beta=beta), models)
            runs[name] = (rounds[0].weak_slices, epochs, models[0].state_dict())
    control, reference, rws = runs["control"], runs["plain-forward"], runs["rws"]
    assert control[0] == reference[0] == rws[0] and control[0] and control[1] == reference[1] == rws[1]
    assert all(torch.equal(control[2][key], reference[2][key]) for key in control[2])
    assert not all(torch.equal(control[2][key], rws[2][key]) for key in control[2])


def test_a_tiny_rws_run_finds_weak_slices_writes_its_report_and_draws_them(tmp_path):
    dataset, rounds, epochs = tiny_run(tmp_path, tiny_recipe())
    assert epochs == [1, 2]  # one global and one retraining epoch of one step each (3 images, batch 2)
    found = rounds[0]
    assert found.threshold == 0.99 and found.windows > 0 and found.plain_steps == 0
    assert found.weak_slices and all(s.attention < 0.99 for s in found.weak_slices)
    assert set(found.seconds) == {"heatmaps", "local", "retrain"}
    assert any(maps["beta"].max() > 0 for maps in found.shown.values())  # some features were blended
    assert 0 <= found.attention["global_mean"] <= 1 and 0 <= found.attention["local_mean"] <= 1
    write_rws_report(tmp_path / "rws", rounds, 12.5)
    report = json.loads((tmp_path / "rws/report.json").read_text())
    assert report["enabled"] and report["train_seconds"] == 12.5
    assert report["rounds"][0]["weak_slices"] == len(found.weak_slices)
    slices = json.loads((tmp_path / "rws/slices.json").read_text())["slices"]
    assert len(slices) == len(found.weak_slices) and all(len(s["box"]) == 4 for s in slices)
    dataset.save(tmp_path / "dataset.json")
    result = CliRunner().invoke(app, ["rws", "show", next(iter(found.shown)), "--rws", str(tmp_path / "rws"),
                                      "--dataset", str(tmp_path / "dataset.json"), "--out", str(tmp_path / "show.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "show.png").is_file()
    listed = CliRunner().invoke(app, ["rws", "ls", "--rws", str(tmp_path / "rws")])
    assert listed.exit_code == 0 and f"{len(found.weak_slices)} weak slices" in listed.output
    assert f"heatmaps: {' '.join(sorted(found.shown))}" in listed.output
    unknown = CliRunner().invoke(app, ["rws", "show", "nope", "--rws", str(tmp_path / "rws"), "--dataset",
                                       str(tmp_path / "dataset.json")])
    assert unknown.exit_code == 2 and "no heatmaps of 'nope' (see `wsss rws ls`)" in unknown.output


def test_a_round_without_weak_slices_trains_the_rest_of_the_budget_plainly(tmp_path, monkeypatch):
    monkeypatch.setattr(rws_training, "select_weak_slices", lambda *args, **kwargs: [])
    _, rounds, epochs = tiny_run(tmp_path, tiny_recipe())
    assert len(rounds) == 1 and not rounds[0].weak_slices and rounds[0].plain_steps == 2
    assert epochs == [1, 2, 3]  # 1 global step, then the 2 steps left, one a (one-step) epoch


def test_a_round_finding_as_many_slices_as_the_last_stops_rws_within_the_budget(tmp_path):
    recipe = tiny_recipe(rounds=2, local_iteration_fraction=0.1, retrain_iteration_fraction=0.2)
    _, rounds, epochs = tiny_run(tmp_path, recipe.model_copy(update={"epochs": 7}))
    assert len(rounds) == 2 and len(rounds[1].weak_slices) > 0.95 * len(rounds[0].weak_slices)
    assert rounds[0].plain_steps == 0 and rounds[1].plain_steps == 2
    assert epochs == [1, 2, 3, 4, 5, 6]  # 3 global, 1 retraining (+1 local, unreported), 2 plain: 7 steps


def test_rws_off_writes_only_the_training_time(tmp_path):
    write_rws_report(tmp_path / "rws", None, 3.0, "seg.rws.enabled is false")
    assert sorted(p.name for p in (tmp_path / "rws").iterdir()) == ["report.json"]
    assert json.loads((tmp_path / "rws/report.json").read_text()) == {
        "enabled": False, "skipped": "seg.rws.enabled is false", "train_seconds": 3.0}


# RWS's blending at test time (spec 3.7's optional variant, `seg.eval_rws_blend`)

def blend_at_test_time(model, local, threshold, images):
    blend = RwsBlendedSegmenter(model, local, RwsParams(enabled=True, slice_size=32, slice_stride=16, cam_pixels="all"),
                          threshold)
    with torch.no_grad():
        return blend(images), blend.blended_inputs


def test_test_time_blending_without_weak_slices_or_with_itself_gives_the_plain_logits(segmenter):
    torch.manual_seed(5)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        plain = torch.cat([segmenter(image) for image in images.split(1)])  # one image per forward, as the blend
    none, blended = blend_at_test_time(segmenter, copy.deepcopy(segmenter), 0.0, images)  # no attention is below 0
    assert blended == 0 and torch.equal(none, plain)
    itself, blended = blend_at_test_time(segmenter, copy.deepcopy(segmenter), 1.01, images)  # every window is weak
    assert blended == 2 and torch.allclose(itself, plain, atol=1e-5)


def test_test_time_blending_blends_the_weak_slices_the_prediction_and_t_select(segmenter):
    torch.manual_seed(6)
    image = torch.randn(1, 3, 64, 80)
    local = scaled_copy(segmenter)
    rws = RwsParams(enabled=True, slice_size=32, slice_stride=16, cam_pixels="all")
    output, blended = blend_at_test_time(segmenter, local, 1.01, image)
    with torch.no_grad():
        prediction = segmenter(image)[0].argmax(0).numpy().astype(np.uint8)
    attention, _ = heatmaps(segmenter, image, prediction, rws)
    windows = sliding_windows(64, 80, size=32, stride=16)
    weak = select_weak_slices(window_scores("test", attention[-1].numpy(), prediction, prediction, windows,
                                            min_coverage=rws.min_class_fraction), 1.01,
                              max_per_image=rws.max_slices_per_image)
    beta = image_blend(segmenter, local, image, prediction, weak, rws)[0]
    with torch.no_grad():
        expected = blended_forward(segmenter, local, image, beta[None], segmenter.stage_strides())
        plain = segmenter(image)
    assert blended == 1 and weak and beta.max() > 0
    assert torch.allclose(output, expected, atol=1e-6) and not torch.allclose(output, plain, atol=1e-3)


def test_the_rws_folder_keeps_the_last_blending_rounds_local_network_and_t(tmp_path, monkeypatch):
    dataset, rounds, _ = tiny_run(tmp_path, tiny_recipe())
    write_rws_report(tmp_path / "rws", rounds, 1.0)
    report = json.loads((tmp_path / "rws/report.json").read_text())
    assert report["threshold"] == rounds[0].threshold == 0.99
    saved = torch.load(tmp_path / "rws/local.pt", weights_only=True)
    assert all(torch.equal(saved[key], value) for key, value in rounds[0].local.state_dict().items())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rws/report.json").write_text(json.dumps({**report, "threshold": None}))
    from stages.evaluate import rws_blend_report
    skipped = rws_blend_report(rounds[0].local, dataset, [], tiny_recipe(), None, torch.device("cpu"))
    assert skipped == {"miou": None, "skipped": "no RWS round blended, so there is no local network"}


def test_eval_rws_blend_without_rws_is_refused():
    with pytest.raises(ValueError, match="seg.eval_rws_blend needs seg.rws.enabled"):
        SegParams(eval_rws_blend=True)
