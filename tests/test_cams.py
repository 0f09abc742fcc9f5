from functools import partial

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.fixtures import make_dataset
from tests.tiny import tiny_cam_net
from wsss_core.cams.evaluate import cam_metrics, sweep_cams, threshold_grid
from wsss_core.cams.labels import cam_labels
from wsss_core.cams.infer import iterate_cams, multiscale_maps, normalize_present
from wsss_core.cams.store import CamStore, CamStoreWriter
from wsss_core.config import CamsParams
from wsss_core.errors import DataError
from wsss_core.methods.cam import CamMethod

METHOD = CamMethod()


def cam_maps(model):
    return partial(METHOD.cam_maps, model)


def test_cam_is_relu_of_classifier_on_features():
    model = tiny_cam_net(3)
    images = torch.randn(2, 3, 20, 24)
    features = model.backbone(images)
    expected = torch.einsum("kc,bchw->bkhw", model.classifier.weight[:, :, 0, 0], features).clamp(min=0)
    torch.testing.assert_close(model.cams(images), expected)
    # logits are the classifier applied to GAP features = spatial mean of the pre-ReLU CAM
    torch.testing.assert_close(model(images), torch.einsum("kc,bchw->bkhw", model.classifier.weight[:, :, 0, 0], features).mean((2, 3)))


def per_scale_reference(model, image, scales, flip):
    """Straightforward loop: one image, one scale, one flip at a time."""
    height, width = image.shape[-2:]
    total = torch.zeros(model.classifier.out_channels, height, width)
    for scale in scales:
        size = (round(height * scale), round(width * scale))
        scaled = F.interpolate(image[None], size, mode="bilinear", align_corners=False)
        variants = [(scaled, False)] + ([(scaled.flip(-1), True)] if flip else [])
        for variant, flipped in variants:
            cam = F.interpolate(model.cams(variant), (height, width), mode="bilinear", align_corners=False)[0]
            total += cam.flip(-1) if flipped else cam
    return total


@pytest.mark.parametrize("flip", [False, True])
def test_batched_multiscale_equals_per_scale_loop(flip):
    model = tiny_cam_net(3)
    images = torch.randn(3, 3, 21, 30)
    scales = [1.0, 0.5, 1.5, 2.0]
    batched = multiscale_maps(cam_maps(model), images, scales, flip)["cam"]
    assert batched.shape == (3, 3, 21, 30)
    for index in range(3):
        torch.testing.assert_close(batched[index], per_scale_reference(model, images[index], scales, flip),
                                   rtol=1e-5, atol=1e-5)


def test_flip_aggregation_is_flip_equivariant():
    model = tiny_cam_net(3)
    images = torch.randn(2, 3, 16, 22)
    maps = multiscale_maps(cam_maps(model), images, [1.0, 0.5], flip=True)["cam"]
    maps_of_flipped = multiscale_maps(cam_maps(model), images.flip(-1), [1.0, 0.5], flip=True)["cam"]
    torch.testing.assert_close(maps_of_flipped, maps.flip(-1), rtol=1e-5, atol=1e-5)
    symmetric = torch.cat([images[..., :11], images[..., :11].flip(-1)], dim=-1)
    out = multiscale_maps(cam_maps(model), symmetric, [1.0, 1.5], flip=True)["cam"]
    torch.testing.assert_close(out, out.flip(-1), rtol=1e-5, atol=1e-5)


def test_normalize_present_keeps_only_present_classes_with_max_one():
    maps = torch.rand(4, 5, 6) * 7
    maps[2] = 0
    out = normalize_present(maps, np.array([2, 4]))
    assert out.shape == (2, 5, 6)
    np.testing.assert_allclose(out.max((1, 2)), [1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(out[1], (maps[3] / (maps[3].max() + 1e-5)).numpy(), rtol=1e-6)
    assert out.min() >= 0


def test_iterate_cams_shapes_ranges_and_absent_classes(tmp_path):
    dataset = make_dataset(tmp_path)
    model = tiny_cam_net(3)
    hooks, cpu = CamMethod().cam_hooks(model), torch.device("cpu")
    results = {i: (cam, keys) for i, cam, keys, _, _, _ in iterate_cams(
        hooks, dataset, dataset.ids("train"), CamsParams(scales=[1.0, 0.5], flip=True, batch_size=2), device=cpu)}
    assert set(results) == {"a", "b", "c"}
    for image_id, (cam, keys) in results.items():
        image = dataset.read_image(image_id)
        assert keys.tolist() == dataset.labels[image_id]
        assert cam.shape == (len(keys),) + image.shape[:2]
        assert cam.min() >= 0 and cam.max() <= 1
        positive = cam.reshape(len(keys), -1).max(1) > 0
        np.testing.assert_allclose(cam.reshape(len(keys), -1).max(1)[positive], 1.0, atol=1e-4)
    # batched export equals one-image-at-a-time export
    single = {i: cam for i, cam, _, _, _, _ in iterate_cams(
        hooks, dataset, dataset.ids("train"), CamsParams(scales=[1.0, 0.5], flip=True, batch_size=1), device=cpu)}
    for image_id in results:
        np.testing.assert_allclose(results[image_id][0], single[image_id], atol=1e-5)


def test_store_round_trip_with_plain_h5py(tmp_path):
    path = tmp_path / "cams.h5"
    cam = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    attrs = {"method": "cam", "scales": [1.0, 0.5], "stride": 16, "class_names": ["background", "x", "y"],
             "params": {"cams": {"flip": True}}}
    with CamStoreWriter(path, attrs) as writer:
        writer.write("img1", cam, np.array([1, 2]))
        writer.write("img2", np.zeros((0, 3, 4)), np.array([], dtype=np.int64))
    assert not path.with_name("cams.h5.tmp").exists()
    with h5py.File(path, "r") as handle:  # the contract, read without our code
        dataset = handle["img1"]["cam"]
        assert dataset.dtype == np.float16 and dataset.shape == (2, 5, 7)
        assert dataset.chunks == (2, 5, 7) and dataset.compression == "gzip"
        assert dataset.attrs["keys"].tolist() == [1, 2]
        assert handle.attrs["method"] == "cam"
        np.testing.assert_allclose(dataset[()], cam, atol=1e-3)
    with CamStore(path) as store:
        read_cam, keys = store.read("img1")
        assert read_cam.dtype == np.float32 and keys.tolist() == [1, 2]
        assert store.attr("scales") == [1.0, 0.5] and store.class_names == ["background", "x", "y"]
        assert store.read("img2")[0].shape == (0, 3, 4)
        with pytest.raises(DataError, match="no image 'nope'"):
            store.read("nope")


def test_interrupted_writer_leaves_no_file(tmp_path):
    path = tmp_path / "cams.h5"
    with pytest.raises(RuntimeError):
        with CamStoreWriter(path, {"method": "cam"}) as writer:
            writer.write("img1", np.ones((1, 2, 2)), np.array([1]))
            raise RuntimeError("killed")
    assert not path.exists() and not path.with_name("cams.h5.tmp").exists()


def test_cam_labels_hand_made():
    cam = np.array([[[0.9, 0.1], [0.3, 0.2]], [[0.5, 0.6], [0.1, 0.2]]])
    keys = np.array([4, 7])
    np.testing.assert_array_equal(cam_labels(cam, keys, 0.25), [[4, 7], [4, 0]])
    # a tie with the threshold goes to background
    np.testing.assert_array_equal(cam_labels(cam, keys, 0.3), [[4, 7], [0, 0]])


def test_threshold_grid_inclusive():
    assert threshold_grid(0.05, 0.60, 0.05) == [round(0.05 * i, 4) for i in range(1, 13)]


def test_cam_metrics_perfect_cam_and_sweep(tmp_path):
    dataset = make_dataset(tmp_path)
    path = tmp_path / "cams.h5"
    with CamStoreWriter(path, {"method": "cam"}) as writer:
        for image_id in dataset.ids("train"):
            mask = dataset.read_mask(image_id)
            keys = np.array(dataset.labels[image_id])
            writer.write(image_id, np.stack([(mask == k) * 0.8 for k in keys]).astype(np.float32), keys)
    with CamStore(path) as store:
        report = cam_metrics(store, dataset, dataset.ids("train"), seed_bg_threshold=0.85, sweep=[0.1, 0.9, 0.1])
    assert report["seed_bg_threshold"] == 0.85
    # at 0.85 everything is background: IoU(bg) = background share, the 3 classes score 0
    assert report["miou"] == pytest.approx(bg_iou_when_all_background(dataset) / 4)
    assert report["sweep"]["best_miou"] == pytest.approx(1.0)
    assert report["sweep"]["best_threshold"] < 0.8
    assert report["per_class"]["background"] == pytest.approx(bg_iou_when_all_background(dataset))


def test_sweep_activation_uses_the_strongest_labelled_class_and_no_mask(tmp_path):
    dataset = make_dataset(tmp_path)
    ids = dataset.ids("train")
    peaks = {}
    path = tmp_path / "cams.h5"
    with CamStoreWriter(path, {"method": "cam"}) as writer:
        for image_id in ids:
            keys = np.array(dataset.labels[image_id])
            height, width = dataset.read_mask(image_id).shape
            # the first class is 0.25 everywhere, a second one (when labelled) 0.75 on the left half (exact in float16)
            cam = np.zeros((len(keys), height, width), np.float32)
            cam[0] = 0.25
            if len(keys) > 1:
                cam[1, :, : width // 2] = 0.75
            writer.write(image_id, cam, keys)
            peaks[image_id] = cam.max(0)
    with CamStore(path) as store:
        _, _, activation = sweep_cams(store, dataset, ids, [0.1, 0.5, 0.8])
    everything = np.concatenate([peak.ravel() for peak in peaks.values()])
    assert activation["mean_peak"] == pytest.approx(everything.astype(np.float64).mean(), rel=1e-12)
    assert activation["foreground_share"] == pytest.approx([1.0, (everything > 0.5).mean(), 0.0])
    assert 0.0 < activation["foreground_share"][1] < 1.0  # the hand-made set has a multi-class image


def bg_iou_when_all_background(dataset):
    fg = total = 0
    for image_id in dataset.ids("train"):
        mask = dataset.read_mask(image_id)
        valid = mask != 255
        total += valid.sum()
        fg += (mask[valid] > 0).sum()
    return (total - fg) / total


def test_training_is_seeded_and_deterministic_on_cpu(tmp_path):
    from wsss_core.cams.classifier import train_classifier
    from wsss_core.config import ClsParams
    from wsss_core.training import seed_everything

    dataset = make_dataset(tmp_path, sizes=((24, 24),) * 3)
    dataset.splits["val"] = ["a"]
    params = ClsParams(epochs=2, batch_size=2, crop_size=16, resize_long=[16, 24], lr=0.1)

    def run(seed):
        seed_everything(seed)
        model = tiny_cam_net(3, seed=seed)
        history = []
        train_classifier(model, partial(METHOD.training_loss, model), partial(METHOD.class_scores, model), dataset,
                         params, device=torch.device("cpu"), seed=seed,
                         on_epoch_end=lambda epoch, values: history.append(values))
        return model.state_dict(), history

    first, history = run(0)
    second, _ = run(0)
    third, _ = run(1)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) and 0 <= h["val_map"] <= 1 for h in history)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert any(not torch.equal(first[key], third[key]) for key in first)
    # training changed the weights
    assert not torch.equal(first["classifier.weight"], tiny_cam_net(3, seed=0).state_dict()["classifier.weight"])


def test_a_warm_start_trains_its_own_groups_first_and_the_epochs_run_on_through_both_phases(tmp_path):
    from wsss_core.cams.classifier import train_classifier
    from wsss_core.models.groups import TrainingPhase
    from wsss_core.config import ClsParams
    from wsss_core.models.groups import ParamGroup

    dataset = make_dataset(tmp_path, sizes=((24, 24),) * 3)
    dataset.splits["val"] = ["a"]
    recipe = ClsParams(epochs=1, batch_size=2, crop_size=16, resize_long=[16, 24], lr=0.1)
    model = tiny_cam_net(3)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    warm = TrainingPhase("warm start", recipe.model_copy(update={"epochs": 2}),
                         [ParamGroup("new", list(model.classifier.parameters()))],
                         partial(METHOD.training_loss, model))
    snapshots = {}

    def on_epoch_end(epoch, values):
        snapshots[epoch] = {key: value.clone() for key, value in model.state_dict().items()}

    train_classifier(model, partial(METHOD.training_loss, model), partial(METHOD.class_scores, model), dataset,
                     recipe, device=torch.device("cpu"), seed=0, on_epoch_end=on_epoch_end, warm_start=warm)
    assert sorted(snapshots) == [1, 2, 3]
    backbone = [key for key in start if not key.startswith("classifier.")]
    assert backbone and all(torch.equal(snapshots[2][key], start[key]) for key in backbone)  # the warm start's
    assert not torch.equal(snapshots[2]["classifier.weight"], start["classifier.weight"])
    assert any(not torch.equal(snapshots[3][key], start[key]) for key in backbone)  # the method's own phase


def test_random_crop_pads_short_sides_and_keeps_pixels():
    from wsss_core.data.transforms import random_crop

    tensor = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5) + 1
    crop = random_crop(tensor, 4, np.random.default_rng(0))
    assert crop.shape == (2, 4, 4)
    # height 3 < 4: one zero row; width 5 > 4: 4 consecutive columns of the source
    assert (crop[0] == 0).all(1).sum() == 1
    rows = crop[0][(crop[0] != 0).any(1)]
    assert rows.shape == (3, 4) and torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(3, 3))
