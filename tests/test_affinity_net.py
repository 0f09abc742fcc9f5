import math

import numpy as np
import pytest
import torch

from wsss_core.affinity.pairs import neighbour_offsets
from wsss_core.cams.labels import argmax_labels
from wsss_core.data.label_dir import LabelDirWriter, read_label_dir
from wsss_core.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss_core.pseudo import disagreement_to_void


def test_pair_affinities_equal_brute_force():
    features = torch.randn(2, 5, 6, 7)
    offsets = neighbour_offsets(3)
    out = pair_affinities(features, offsets)
    assert out.shape == (2, len(offsets), 6, 7)
    for b in range(2):
        for o, (dy, dx) in enumerate(offsets):
            for y in range(6):
                for x in range(7):
                    inside = 0 <= y + dy < 6 and 0 <= x + dx < 7
                    expected = math.exp(-(features[b, :, y, x] - features[b, :, y + dy, x + dx]).abs().mean().item()) if inside else 0.0
                    assert out[b, o, y, x].item() == pytest.approx(expected, abs=1e-6)


def test_affinity_loss_hand_computed():
    affinity = torch.tensor([0.5, 0.25, 0.9, 0.1])
    bg = torch.tensor([1.0, 0, 0, 0])
    fg = torch.tensor([0, 1.0, 0, 0])
    neg = torch.tensor([0, 0, 1.0, 1.0])
    loss, parts = affinity_loss(affinity, bg, fg, neg)
    expected = {"bg": -math.log(0.5), "fg": -math.log(0.25), "neg": -(math.log(0.1) + math.log(0.9)) / 2}
    for key in expected:
        assert parts[key] == pytest.approx(expected[key], abs=1e-3)
    assert float(loss) == pytest.approx(expected["bg"] / 4 + expected["fg"] / 4 + expected["neg"] / 2, abs=1e-3)


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_affinity_net_stride_8_features(backbone):
    features = AffinityNet(backbone)(torch.zeros(1, 3, 64, 48))
    assert features.shape == (1, 448, 8, 6)


def test_argmax_labels_and_disagreement():
    scores = np.array([[[0.9, 0.1]], [[0.05, 0.2]], [[0.05, 0.7]]])  # [3, 1, 2]: bg, class 4, class 9
    np.testing.assert_array_equal(argmax_labels(scores, np.array([4, 9])), [[0, 9]])
    np.testing.assert_array_equal(disagreement_to_void(np.array([[0, 9, 4]]), np.array([[0, 4, 4]])), [[0, 255, 4]])


def test_label_dir_writer_scores_labelled_pixels_and_is_atomic(tmp_path):
    from tests.fixtures import make_dataset

    dataset = make_dataset(tmp_path)
    folder = tmp_path / "labels"
    with LabelDirWriter(folder, dataset) as writer:
        for image_id in dataset.ids("train"):
            mask = dataset.read_mask(image_id).copy()
            mask[:, 3:5] = 255  # unsure columns (inside the objects) are not scored
            writer.write(image_id, mask)
        assert not folder.exists()
    report = writer.report()
    assert report["miou"] == 1.0
    valid = sum((dataset.read_mask(i) != 255).sum() for i in dataset.ids("train"))
    unsure = sum((dataset.read_mask(i)[:, 3:5] != 255).sum() for i in dataset.ids("train"))
    assert report["coverage"] == pytest.approx((valid - unsure) / valid)
    # counted as background instead (IRN's evaluation): a confusion matrix built by hand
    from wsss_core.metrics import ConfusionMatrix, iou_report

    reference = ConfusionMatrix(dataset.num_classes + 1)
    for image_id in dataset.ids("train"):
        truth = dataset.read_mask(image_id)
        predicted = truth.copy()
        predicted[:, 3:5] = 0
        reference.update(predicted, truth)
    assert report["void_as_background"] == iou_report(reference.matrix, dataset.class_names)
    assert report["void_as_background"]["miou"] < 1.0
    assert read_label_dir(folder, "a").shape == dataset.read_mask("a").shape
    with pytest.raises(RuntimeError):
        with LabelDirWriter(tmp_path / "broken", dataset) as writer:
            writer.write("a", dataset.read_mask("a"))
            raise RuntimeError
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.tmp").exists()


def test_joint_crop_keeps_image_and_labels_aligned_and_pads_labels_void():
    from wsss_core.data.transforms import joint_crop

    labels = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)
    image = np.repeat(labels[..., None], 3, axis=2) + 1
    image_crop, label_crop = joint_crop(image, labels, 8, np.random.default_rng(3))
    assert image_crop.shape == (8, 8, 3) and label_crop.shape == (8, 8)
    padded = label_crop == 255
    assert padded.sum() == 2 * 8  # 2 rows missing: 6 < 8
    np.testing.assert_array_equal(image_crop[..., 0][~padded], label_crop[~padded] + 1)
    assert (image_crop[padded] == 0).all()


def test_frozen_backbone_keeps_encoder_weights_and_statistics_and_trains_new_layers():
    from wsss_core.config import AffinityParams
    from wsss_core.training import build_optimizer

    torch.manual_seed(0)
    model = AffinityNet("resnet18")
    model.freeze_backbone()
    model.train()
    assert not model.encoder.training and model.fuse.training
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    fuse_before = model.fuse.weight.detach().clone()
    optimizer = build_optimizer(model.parameter_groups(10.0), AffinityParams(lr=0.1))
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # weights and BN running stats
    assert not torch.equal(model.fuse.weight, fuse_before)


def test_native_layout_gives_stride_8_features_and_trains_the_backbone():
    """Native strides 8/16/32 resized to stride 8: same feature shape as the dilated layout, gradient into the backbone."""
    torch.manual_seed(0)
    native, dilated = AffinityNet("resnet18", dilated=False), AffinityNet("resnet18")
    assert native.encoder.feature_info.reduction() == [8, 16, 32]
    assert dilated.encoder.feature_info.reduction() == [8, 8, 8]
    images = torch.randn(2, 3, 72, 104)
    features = native(images)
    assert features.shape == dilated(images).shape == (2, 448, 9, 13)
    offsets = neighbour_offsets(3)
    affinity = pair_affinities(features, offsets)
    masks = [torch.rand(2, len(offsets), 9, 13).round() for _ in range(3)]
    loss, _ = affinity_loss(affinity, *masks)
    loss.backward()
    first_conv = native.encoder.conv1.weight.grad
    deepest = native.encoder.layer4[0].downsample[0].weight.grad  # the stride-32 stage (timm zero-inits last BNs)
    assert first_conv is not None and first_conv.abs().sum() > 0 and deepest.abs().sum() > 0
