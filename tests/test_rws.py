"""RWS core (wsss_core/seg/rws.py) on tiny hand-made inputs: Seg-Grad-CAM, windows, T, weak slices, blending."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.seg.rws import (StageRecorder, WindowScore, attention_threshold, blend_weights,
                               class_attention_maps, curve_iou, local_slices, pool_to_grid,
                               seg_grad_cam, seg_grad_cam_raw, select_weak_slices, slice_iou, sliding_windows,
                               window_scores)


class TinySeg(nn.Module):
    """Two conv stages (strides 2, 4) and a bias-free 1x1 head; logits upsampled to the input unless told."""

    def __init__(self, classes: int = 3, upsample: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, classes, 1, bias=False)
        self.upsample = upsample

    def stage_modules(self) -> list[nn.Module]:
        return [self.stage1, self.stage2]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.stage2(self.stage1(images)))
        if self.upsample:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _manual_cam(model: TinySeg, image: torch.Tensor, c: int, stage: int) -> torch.Tensor:
    """Grad-CAM of one image, one class, one stage from its own forward and its own gradient call."""
    first = model.stage1(image[None])
    second = model.stage2(first)
    logits = F.interpolate(model.head(second), size=image.shape[-2:], mode="bilinear", align_corners=False)
    target = logits[:, c][logits.argmax(1) == c].sum()
    feature = (first, second)[stage]
    (gradient,) = torch.autograd.grad(target, feature)
    return F.relu((gradient.mean((2, 3), keepdim=True) * feature).sum(1))[0].detach()


def test_seg_grad_cam_equals_manual_gradients_per_stage_and_image():
    model, images = TinySeg().eval(), _images()
    with StageRecorder(model.stage_modules()) as recorder:
        logits = model(images)
    features = recorder.features()
    classes = [0, 1, 2]
    raw = seg_grad_cam_raw(features, logits, classes)
    assert [tuple(maps.shape) for maps in raw] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    for b in range(2):
        for j, c in enumerate(classes):
            for stage in range(2):
                torch.testing.assert_close(raw[stage][b, j], _manual_cam(model, images[b], c, stage),
                                           rtol=1e-5, atol=1e-6)
    normalised = seg_grad_cam(features, logits, classes)
    assert normalised.shape == (2, 2, 3, 16, 16)
    for b in range(2):
        for stage in range(2):
            for j in range(3):
                up = F.interpolate(raw[stage][b, j][None, None], size=(16, 16), mode="bilinear",
                                   align_corners=False)[0, 0]
                span = up.max() - up.min()
                expected = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
                torch.testing.assert_close(normalised[b, stage, j], expected)
    assert normalised.min() >= 0 and normalised.max() <= 1


def test_seg_grad_cam_closed_form_for_a_linear_head():
    """Head = 1x1 conv w, no upsampling: alpha^k = w[c, k] |M| / (h w), so H = ReLU(|M| / (h w) y^c)."""
    model, images = TinySeg(upsample=False).eval(), _images(batch=1)
    with StageRecorder(model.stage_modules()) as recorder:
        logits = model(images)
    for c in range(3):
        (maps,) = seg_grad_cam_raw(recorder.features()[1:], logits, [c])
        region = (logits.argmax(1) == c).sum()
        expected = F.relu(region / logits[0, c].numel() * logits[0, c]).detach()
        torch.testing.assert_close(maps[0, 0], expected, rtol=1e-5, atol=1e-6)
        (every,) = seg_grad_cam_raw(recorder.features()[1:], logits, [c], pixels="all")
        torch.testing.assert_close(every[0, 0], F.relu(logits[0, c]).detach(), rtol=1e-5, atol=1e-6)


def test_class_attention_maps_compose_the_label_classes():
    model, images = TinySeg().eval(), _images()
    labels = torch.zeros(2, 16, 16, dtype=torch.int64)
    labels[:, 2:9, 3:12], labels[0, 10:, :] = 1, 2
    labels[1, 12:, :4] = 255
    attention, logits = class_attention_maps(model, images, labels)
    with StageRecorder(model.stage_modules()) as recorder:
        again = model(images)
    maps = seg_grad_cam(recorder.features(), again, [1, 2])
    torch.testing.assert_close(logits, again.detach())
    assert attention.shape == (2, 2, 16, 16) and not attention.requires_grad
    for c, index in ((1, 0), (2, 1)):
        region = (labels == c)[:, None].expand_as(attention)
        torch.testing.assert_close(attention[region], maps[:, :, index][region])
    assert (attention[(labels == 0)[:, None].expand_as(attention)] == 0).all()
    assert (attention[(labels == 255)[:, None].expand_as(attention)] == 0).all()
    with_background, _ = class_attention_maps(model, images, labels, skip_background=False)
    assert (with_background[(labels == 0)[:, None].expand_as(attention)] > 0).any()


def test_stage_recorder_transform_feeds_the_next_stage_only():
    model, images = TinySeg().eval(), _images()
    with StageRecorder(model.stage_modules()) as plain:
        model(images)
    with StageRecorder(model.stage_modules(), lambda index, output: output + 1 if index == 1 else output) as late:
        model(images)
    assert torch.equal(late.features()[0], plain.features()[0])
    assert torch.equal(late.features()[1], plain.features()[1] + 1)
    with StageRecorder(model.stage_modules(), lambda index, output: output + 1 if index == 0 else output) as early:
        model(images)
    assert not torch.equal(early.features()[1], plain.features()[1])
    with pytest.raises(ValueError, match="did not run"):
        StageRecorder(model.stage_modules()).features()


def test_sliding_windows():
    assert len(sliding_windows(384, 384)) == 25
    assert len(sliding_windows(320, 320)) == 16
    windows = sliding_windows(375, 500)
    assert len(windows) == 35
    assert sorted({y0 for y0, _, _, _ in windows}) == [0, 64, 128, 192, 247]
    assert sorted({x0 for _, x0, _, _ in windows}) == [0, 64, 128, 192, 256, 320, 372]
    assert all(y1 - y0 == 128 and x1 - x0 == 128 for y0, x0, y1, x1 in windows)
    covered = np.zeros((375, 500), bool)
    for y0, x0, y1, x1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert sliding_windows(100, 50) == [(0, 0, 100, 50)]
    assert sliding_windows(100, 200) == [(0, 0, 100, 128), (0, 64, 100, 192), (0, 72, 100, 200)]


def test_slice_iou():
    label = np.array([[1, 1, 0], [0, 255, 2]])
    assert slice_iou(label, label, 1) == 1.0
    assert slice_iou(np.array([[0, 0, 1], [1, 0, 0]]), label, 1) == 0.0
    assert slice_iou(np.array([[1, 1, 0], [0, 1, 2]]), label, 1) == 1.0  # a prediction on a 255 pixel is dropped
    assert slice_iou(label, label, 3) is None


# a 4 x 7 label and its last-stage attention; size-4 windows at stride 2: (0,0,4,4), (0,2,4,6), flush (0,3,4,7)
LABEL = np.array([[1, 1, 0, 0, 2, 2, 2],
                  [1, 1, 0, 0, 2, 2, 2],
                  [0, 0, 0, 0, 2, 2, 2],
                  [255, 0, 0, 0, 0, 0, 3]])
ATTENTION = np.array([[0.2, 0.2, 0, 0, 0.3, 0.6, 0.9],
                      [0.2, 0.2, 0, 0, 0.3, 0.6, 0.9],
                      [0, 0, 0, 0, 0.3, 0.6, 0.9],
                      [0, 0, 0, 0, 0, 0, 0.1]])
PREDICTION = np.array([[1, 1, 0, 0, 2, 2, 2],
                       [1, 0, 0, 0, 2, 2, 2],
                       [1, 0, 0, 0, 2, 2, 2],
                       [0, 0, 0, 0, 0, 0, 0]])
W0, W1, W2 = (0, 0, 4, 4), (0, 2, 4, 6), (0, 3, 4, 7)


def _scores(**options) -> list[WindowScore]:
    windows = sliding_windows(4, 7, size=4, stride=2)
    assert windows == [W0, W1, W2]
    return window_scores("a", ATTENTION, PREDICTION, LABEL, windows, **options)


def test_window_scores_on_a_hand_made_heatmap():
    scores = _scores()
    assert [(s.box, s.cls) for s in scores] == [(W0, 1), (W1, 2), (W2, 2), (W2, 3)]
    assert [s.attention for s in scores] == pytest.approx([0.2, 0.45, 0.6, 0.1])
    assert [s.iou for s in scores] == pytest.approx([0.6, 1.0, 1.0, 0.0])  # W0: 3 common pixels of 5
    assert [(s.box, s.cls) for s in _scores(min_coverage=0.1)] == [(W0, 1), (W1, 2), (W2, 2)]  # class 3: 1/16
    whole = [s.attention for s in _scores(region="window")]
    assert whole == pytest.approx([0.8 / 15, 2.7 / 16, 5.4 / 16, 0.1 / 16])  # the 255 pixel leaves W0's count


def test_weak_slice_selection_and_local_dedupe():
    scores = _scores()
    weak = select_weak_slices(scores, 0.5)
    assert [(s.box, s.cls) for s in weak] == [(W2, 3), (W0, 1), (W1, 2)]
    weak = select_weak_slices(scores, 0.7)
    assert [(s.box, s.cls) for s in weak] == [(W2, 3), (W0, 1), (W1, 2), (W2, 2)]
    assert local_slices(weak) == [("a", W2), ("a", W0), ("a", W1)]  # W2 chosen by classes 3 and 2: once
    assert [(s.box, s.cls) for s in select_weak_slices(scores, 0.7, max_per_image=2)] == [(W2, 3), (W0, 1)]
    both = select_weak_slices(scores, 0.7, rule="attention_and_iou", iou_bounds={1: 0.5, 2: 2.0})
    assert [(s.box, s.cls) for s in both] == [(W2, 3), (W1, 2), (W2, 2)]  # W0's IoU 0.6 >= 0.5; class 3 unbounded
    assert set(select_weak_slices(scores, 0.3)) <= set(select_weak_slices(scores, 0.5))
    with pytest.raises(ValueError, match="iou_bounds"):
        select_weak_slices(scores, 0.5, rule="attention_and_iou")


def _curve(cls: int, points: list[tuple[int, int, float]]) -> list[WindowScore]:
    """WindowScores at the centres of 20 bins: (bin, how many windows, IoU)."""
    return [WindowScore("a", (0, 0, 1, 1), cls, (b + 0.5) / 20, iou) for b, count, iou in points for _ in range(count)]


def test_threshold_on_a_hand_made_curve():
    scores = (_curve(1, [(0, 5, 0.1), (1, 5, 0.2), (2, 5, 0.3), (3, 5, 0.3005), (5, 4, 0.0)])  # slopes 2, 2, 0.01
              + _curve(2, [(10, 5, 0.2), (11, 4, 0.2), (12, 5, 0.9), (14, 5, 0.9)])  # bin 11 dropped: slopes 7, 0
              + _curve(3, [(6, 5, 0.5), (8, 5, 0.5)])  # two bins: no T_c
              + _curve(4, [(0, 5, 0.1), (1, 6, 0.5), (2, 5, 0.9)]))  # never flat: the highest bin
    result = attention_threshold(scores)
    assert result.per_class == {1: 0.125, 2: 0.625, 4: 0.125}
    assert result.value == pytest.approx(0.875 / 3, abs=1e-12)
    np.testing.assert_allclose(result.curves[2].centres, [0.525, 0.625, 0.725])
    np.testing.assert_allclose(result.curves[2].mean_iou, [0.2, 0.9, 0.9])
    assert result.curves[2].counts.tolist() == [5, 5, 5] and result.curves[3].threshold is None
    assert curve_iou(result, 0.575)[2] == pytest.approx(0.55)
    strict = attention_threshold(scores, slope=0.005)
    assert strict.per_class == {1: 0.175, 2: 0.625, 4: 0.125} and strict.value >= result.value
    assert attention_threshold(scores, min_count=4).per_class[2] == 0.525  # bin 11 kept: flat from bin 10
    with pytest.raises(ValueError, match="too few windows"):
        attention_threshold(_curve(3, [(6, 5, 0.5), (8, 5, 0.5)]))


def _hand_made_attention() -> tuple[torch.Tensor, torch.Tensor]:
    """Global A and local A^s [3 layers, 1, 4 pixels]; one slice covering the row."""
    glob = torch.tensor([[0.2, 0.0, 0.0, 0.6], [0.4, 0.0, 0.5, 0.3], [0.8, 0.0, 0.5, 0.2]])[:, None]
    local = torch.tensor([[0.5, 0.9, 0.4, 0.9], [0.4, 0.9, 0.6, 0.6], [0.5, 0.9, 0.6, 0.25]])[:, None]
    return glob, local


def test_blend_weights_on_hand_made_maps():
    glob, local = _hand_made_attention()
    beta, owner = blend_weights(glob, [(0, 0, 1, 4)], [local])
    # pixel 0, layer 1: r = 0.25, r^s = 1 -> lambda 0.2; pixel 2, layer 1: A = 0 -> lambda 0;
    # pixel 3, layer 2: r = 0.5, r^s = 2/3 -> lambda 3/7; pixel 3, layer 3: A^s > A but r^s < r; pixel 1: Gamma = 0
    expected = torch.tensor([[0.8, 0, 1, 0], [0, 0, 0, 4 / 7], [0, 0, 0, 0]])[:, None]
    torch.testing.assert_close(beta, expected)
    assert torch.equal(owner, torch.where(expected > 0, 0, -1))
    assert torch.equal(blend_weights(glob, [(0, 0, 1, 4)], [glob]).owner, torch.full_like(owner, -1))  # A^s = A


def test_blend_weight_invariants_on_random_maps():
    generator = torch.Generator().manual_seed(0)
    glob = torch.rand(4, 12, 12, generator=generator)
    glob[:, :, :3] = 0  # outside every class region: Gamma = 0
    boxes = [(0, 0, 8, 8), (4, 4, 12, 12)]
    locals_ = [torch.rand(4, 8, 8, generator=generator) for _ in boxes]
    beta, owner = blend_weights(glob, boxes, locals_)
    selected = owner >= 0
    assert selected.any() and (beta[selected] > 0.5).all() and (beta[selected] <= 1).all()  # lambda in [0, 0.5)
    assert (beta[~selected] == 0).all()
    most_attended = glob.argmax(0, keepdim=True)
    assert not selected.gather(0, most_attended).any()
    assert not selected[:, :, :3].any()


def test_owner_rule_on_two_overlapping_slices():
    glob = torch.tensor([[0.2] * 6, [0.8] * 6])[:, None]  # r = 0.25 on layer 1, layer 2 the most attended
    first = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0] * 4])[:, None]  # r^s = 0.5 on pixels 0..3
    second = torch.tensor([[0.9, 0.3, 0.4, 0.4], [1.0] * 4])[:, None]  # r^s = 0.9, 0.3, 0.4, 0.4 on pixels 2..5
    boxes = [(0, 0, 1, 4), (0, 2, 1, 6)]
    beta, owner = blend_weights(glob, boxes, [first, second])
    assert owner[0, 0].tolist() == [0, 0, 1, 0, 1, 1] and (owner[1] == -1).all()
    rs = torch.tensor([0.5, 0.5, 0.9, 0.5, 0.4, 0.4])
    torch.testing.assert_close(beta[0, 0], 1 - 0.25 / (0.25 + rs))
    swapped = blend_weights(glob, boxes[::-1], [second, first])
    assert torch.equal(swapped.beta, beta) and torch.equal(swapped.owner, torch.where(owner >= 0, 1 - owner, -1))


def test_ablation_switches():
    glob, local = _hand_made_attention()
    box = [(0, 0, 1, 4)]
    silent = local.clone()
    silent[:, :, 1] = 0
    beta, owner = blend_weights(glob, box, [silent], no_omega=True)
    assert (owner == 0).all()  # every pixel and layer of the slice, the Gamma = 0 pixel included
    assert (beta[:, 0, 1] == 0.5).all()  # r = r^s = 0 there: lambda 0.5
    torch.testing.assert_close(beta[0, 0], torch.tensor([0.8, 0.5, 1.0, 0.5]))  # pixel 3: r = r^s = 1, lambda 0.5
    fixed, fixed_owner = blend_weights(glob, box, [local], no_lambda=True)
    assert torch.equal(fixed_owner, blend_weights(glob, box, [local]).owner)
    assert torch.equal(fixed, torch.where(fixed_owner >= 0, 0.5, 0.0))
    only_second, _ = blend_weights(glob, box, [local], layers=[2])
    assert torch.equal(only_second[1], blend_weights(glob, box, [local]).beta[1])
    assert (only_second[[0, 2]] == 0).all()


def test_pool_to_grid_averages_each_stride_block_and_its_partial_border():
    beta = torch.arange(30.0).reshape(5, 6) / 30
    pooled = pool_to_grid(beta, 2, (3, 3))
    expected = torch.tensor([[beta[r:r + 2, c:c + 2].mean() for c in (0, 2, 4)] for r in (0, 2, 4)])
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(pooled[2, 0], beta[4, 0:2].mean())
    with pytest.raises(ValueError, match="grid"):
        pool_to_grid(beta, 2, (2, 3))


@pytest.mark.parametrize("arch, backbone", [("deeplabv3plus", "resnet18"), ("deeplabv3plus", "tf_efficientnet_lite0")])
def test_segmenters_expose_their_stages_from_stride_4_on(arch, backbone):
    from wsss_core.models.deeplab import build_segmenter
    model = build_segmenter(arch, backbone, 3, output_stride=8).eval()
    with StageRecorder(model.stage_modules()) as recorder:
        model(torch.randn(1, 3, 64, 64))
    assert [64 // feature.shape[-1] for feature in recorder.features()] == [4, 8, 8, 8]
