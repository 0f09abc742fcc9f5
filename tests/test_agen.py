"""AGEN (spec ../shared/methods/agen.md section 8): CoAM, seeds, losses, the network's wiring and the method."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.cams.seeds import images_missing_a_class, seed_probabilities, threshold_seeds
from wsss_core.config import ClsParams, CrfParams, parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import get_method, method_params
from wsss_core.methods.agen import SEED_ONSET_STEPS, AGENMethod, AGENParams, padding_mask
from wsss_core.models.agen import AGENNet, AGENOutputs, ContextAttention, coam_attention, init_new_layers
from wsss_core.pool import WorkerPool
from wsss_core.cams import seed_losses
from wsss_core.cams.seed_losses import balanced_seed_loss, boundary_loss, clipped_distribution
from wsss_core.training import batchnorm_layers

K = 20
TINY = dict(cls_backbone="vgg16", seg_backbone="resnet38d", width=1 / 16, cls_head_channels=16, agm_cls_channels=8,
            agm_seg_channels=8, seg_head_channels=8, seg_head_dilation=2)


def tiny_net(**overrides) -> AGENNet:
    torch.manual_seed(0)
    return AGENNet(K, **{**TINY, **overrides})


def tiny_method(**model) -> AGENMethod:
    return AGENMethod(AGENParams.model_validate({"model": {"width": 1 / 16, "boundary_weight": 0.0, **model}}))


def in_process(function, jobs):
    return [function(job) for job in jobs]


# CoAM (tests 1-7)

def test_coam_with_zero_gain_is_the_identity_for_any_upper_map():
    coam = ContextAttention()
    lower, upper = torch.randn(2, 5, 7, 6), torch.randn(2, 5, 3, 4) * 100
    assert coam.gain.item() == 0.0 and torch.equal(coam(lower, upper), lower)


def test_coam_keeps_the_lower_shape_and_refuses_a_class_mismatch():
    coam = ContextAttention()
    assert coam(torch.randn(1, 4, 9, 9), torch.randn(1, 4, 5, 5)).shape == (1, 4, 9, 9)
    with pytest.raises(ValueError, match="4 channels, upper map 3"):
        coam(torch.randn(1, 4, 9, 9), torch.randn(1, 3, 9, 9))


def test_coam_attention_rows_are_distributions_over_the_lower_positions():
    attention = coam_attention(torch.randn(2, 4, 5, 3), torch.randn(2, 4, 2, 2))
    assert attention.shape == (2, 15, 15) and (attention >= 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(2, 15), atol=1e-6)


def test_fused_coam_equals_the_explicit_matrix_and_a_plain_loop():
    torch.manual_seed(1)
    lower, upper = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 3, 3)
    fused, explicit = ContextAttention("sdpa"), ContextAttention("explicit")
    for coam in (fused, explicit):
        coam.gain.data.fill_(0.7)
    resized = F.interpolate(upper, (6, 5), mode="bilinear", align_corners=False)
    x, y = lower.flatten(2), resized.flatten(2)  # [B, K, N]
    loop = torch.empty_like(x)
    for b in range(2):
        for i in range(30):
            weights = torch.softmax(torch.stack([x[b, :, i] @ y[b, :, j] for j in range(30)]), 0)
            loop[b, :, i] = x[b, :, i] + 0.7 * sum(weights[j] * x[b, :, j] for j in range(30))
    loop = loop.reshape(lower.shape)
    assert torch.allclose(explicit(lower, upper), loop, atol=1e-5)
    assert torch.allclose(fused(lower, upper), loop, atol=1e-5)


def test_fused_coam_runs_the_fused_cpu_kernel_and_gives_the_explicit_gradients():
    torch.manual_seed(3)
    lower, upper = torch.randn(2, 5, 12, 10, requires_grad=True), torch.randn(2, 5, 6, 5)
    gradients = []
    for impl in ("explicit", "sdpa"):
        coam = ContextAttention(impl)
        coam.gain.data.fill_(0.4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            coam(lower, upper).square().sum().backward()
        gradients.append(lower.grad.clone())
        lower.grad = None
    ops = {event.key for event in profiler.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops and "aten::_softmax" not in ops
    assert torch.allclose(gradients[1], gradients[0], atol=1e-4)


def test_coam_is_equivariant_to_a_permutation_of_positions():
    torch.manual_seed(2)
    coam = ContextAttention()
    coam.gain.data.fill_(1.3)
    lower, upper = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    order = torch.randperm(16)
    permute = lambda t: t.flatten(2)[..., order].reshape(t.shape)  # noqa: E731
    assert torch.allclose(coam(permute(lower), permute(upper)), permute(coam(lower, upper)), atol=1e-5)


def test_coam_with_a_constant_upper_map_adds_the_mean_of_the_lower_map():
    coam = ContextAttention()
    coam.gain.data.fill_(0.5)
    lower = torch.randn(1, 3, 4, 5)
    expected = lower + 0.5 * lower.mean((2, 3), keepdim=True)
    assert torch.allclose(coam(lower, torch.full((1, 3, 2, 2), 2.0)), expected, atol=1e-5)


def test_coam_gains_start_at_zero_and_learn_from_the_classification_loss():
    model = tiny_net()
    outputs = model.outputs(torch.randn(2, 3, 33, 33))
    labels = torch.zeros(2, K)
    labels[:, 3] = 1
    loss = sum(F.binary_cross_entropy_with_logits(m.mean((2, 3)), labels) for m in outputs.class_maps.values())
    loss.backward()
    assert model.coam_gains() == {3: 0.0, 4: 0.0, 5: 0.0}
    assert all(module.gain.grad.abs() > 0 for module in model.coam.values())


# Seeds (tests 8-11)

def test_seed_probabilities_are_max_normalised_over_the_image_classes_only():
    torch.manual_seed(3)
    maps = torch.randn(1, 4, 5, 5)
    maps[0, 2] = -1.0  # a labelled class with no activation
    labels = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    probabilities = seed_probabilities(maps, labels, (10, 10), alpha=8.0)
    assert probabilities.shape == (1, 5, 10, 10) and probabilities.min() >= 0 and probabilities.max() <= 1
    peaks = probabilities.flatten(2).amax(2)[0]
    assert torch.allclose(peaks[[1, 4]], torch.ones(2), atol=1e-4)  # present classes peak at 1
    assert peaks[2] == 0 and peaks[3] == 0  # absent class 2 (channel 2) and all-negative class 3
    foreground = probabilities[0, 1:].amax(0)
    assert torch.allclose(probabilities[0, 0], (1 - foreground) ** 8)
    assert torch.all(probabilities[0, 0][foreground == 0] == 1)


def test_min_max_seed_probabilities_keep_a_peak_for_a_class_negative_everywhere():
    maps = torch.tensor([[[[-3.0, -1.0, -100.0], [-2.0, -5.0, -100.0]]]])  # [1, 1, 2, 3]; last column is padding
    valid = torch.tensor([[[True, True, False], [True, True, False]]])
    labels = torch.ones(1, 1)
    paper = seed_probabilities(maps, labels, (2, 3), alpha=8.0, valid=valid)
    assert torch.all(paper[0, 1] == 0) and torch.all(paper[0, 0] == 1)  # Eq. 3: all background
    ours = seed_probabilities(maps, labels, (2, 3), alpha=8.0, valid=valid, normalisation="min_max")
    expected = torch.tensor([[0.5, 1.0, 0.0], [0.75, 0.0, 0.0]])  # (Z + 5) / 4 inside, 0 on padding
    assert torch.allclose(ours[0, 1], expected, atol=1e-5)
    assert torch.allclose(ours[0, 0], (1 - expected) ** 8, rtol=1e-4)
    seeds = threshold_seeds(ours, valid, 0.3)
    assert seeds.tolist() == [[[1, 1, 255], [1, 0, 255]]]  # the peak seeds the class; the minimum background
    with pytest.raises(ValueError, match="normalisation 'softmax'"):
        seed_probabilities(maps, labels, (2, 3), alpha=8.0, normalisation="softmax")


def one_pixel(*foreground: float) -> torch.Tensor:
    """P [1, 1 + len, 1, 1] for hand-set foreground values, the background (1 - max)^8."""
    values = torch.tensor(foreground)
    return torch.cat([(1 - values.max()).reshape(1) ** 8, values]).reshape(1, -1, 1, 1)


@pytest.mark.parametrize("foreground, delta, expected", [
    ((0.13, 0.0), 0.3, 0), ((0.15, 0.0), 0.3, 255), ((0.29, 0.0), 0.3, 255), ((0.31, 0.0), 0.3, 1),
    ((0.0, 0.31), 0.3, 2), ((0.5, 0.35), 0.3, 255), ((0.108, 0.0), 0.4, 0), ((0.109, 0.0), 0.4, 255)])
def test_threshold_rule_on_hand_set_pixels(foreground, delta, expected):
    seeds = threshold_seeds(one_pixel(*foreground), torch.ones(1, 1, 1, dtype=torch.bool), delta)
    assert seeds.item() == expected


def test_background_seeds_need_max_foreground_below_one_minus_delta_to_the_eighth_root():
    assert 1 - 0.3 ** (1 / 8) == pytest.approx(0.1397, abs=1e-4)
    assert 1 - 0.4 ** (1 / 8) == pytest.approx(0.1082, abs=1e-4)


def test_seed_modes_range_top_and_topk_fraction():
    probabilities = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]).reshape(1, 1, 2, 5)
    probabilities = torch.cat([1 - probabilities, probabilities], 1)  # background, one class
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    range_top = threshold_seeds(probabilities, valid, 0.25, "range_top")[0].flatten().tolist()
    assert range_top == [0, 0, 0, 255, 255, 255, 255, 255, 1, 1]  # >= 0.75 in one channel only
    top = threshold_seeds(probabilities, valid, 0.2, "topk_frac")[0].flatten().tolist()
    assert top == [0, 0, 255, 255, 255, 255, 255, 255, 1, 1]  # the top 20 % of each channel


def test_background_seed_mode_changes_only_the_background_channels_rule():
    probabilities = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]).reshape(1, 1, 2, 5)
    probabilities = torch.cat([1 - probabilities, probabilities], 1)  # background, one class
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    mixed = threshold_seeds(probabilities, valid, 0.25, "range_top", "value")[0].flatten().tolist()
    assert mixed == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]  # background where P_0 > 0.25, the class where P_1 >= 0.75
    same = threshold_seeds(probabilities, valid, 0.25, "range_top", "range_top")
    assert torch.equal(same, threshold_seeds(probabilities, valid, 0.25, "range_top"))


def test_seeds_hold_only_the_image_classes_background_and_void_and_void_the_padding():
    torch.manual_seed(4)
    maps, labels = torch.randn(2, K, 9, 9), torch.zeros(2, K)
    labels[0, [2, 7]] = 1
    labels[1, 11] = 1
    valid = torch.ones(2, 65, 65, dtype=torch.bool)
    valid[:, 50:] = False
    seeds = threshold_seeds(seed_probabilities(maps, labels, (65, 65), alpha=8.0), valid, 0.3)
    assert seeds.dtype == torch.int64 and not seeds.requires_grad
    assert set(seeds[0].unique().tolist()) <= {0, 3, 8, 255} and set(seeds[1].unique().tolist()) <= {0, 12, 255}
    assert (seeds[:, 50:] == 255).all() and (seeds[:, :50] != 255).any()


def test_padding_mask_finds_the_zero_padded_border():
    images = torch.randn(1, 3, 6, 6)
    images[..., 4:, :] = 0
    assert padding_mask(images)[0].sum() == 24 and not padding_mask(images)[0, 4:].any()


# Losses (tests 12-15)

def test_balanced_seed_loss_on_a_hand_computed_case():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, 0] = math.log(2.0)  # pixel 0: probabilities (1/4, 2/4, 1/4)
    seeds = torch.tensor([[[1, 2, 0, 255]]])
    expected = -(math.log(0.5) + math.log(1 / 3)) / 2 - math.log(1 / 3)
    assert balanced_seed_loss(logits, seeds).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_seed_loss_properties():
    seeds = torch.tensor([[[1, 1, 0, 255], [2, 0, 0, 255]]])
    one_hot = F.one_hot(torch.where(seeds == 255, 0, seeds), 3).permute(0, 3, 1, 2).float() * 30
    assert balanced_seed_loss(one_hot, seeds).item() < 1e-6
    logits = torch.randn(1, 3, 2, 4, requires_grad=True)
    log_probabilities = F.log_softmax(logits.detach(), 1)[0]
    background_only = torch.tensor([[[0, 0, 255, 255], [0, 255, 255, 255]]])
    expected = -(log_probabilities[0, 0, 0] + log_probabilities[0, 0, 1] + log_probabilities[0, 1, 0]) / 3
    assert balanced_seed_loss(logits, background_only).item() == pytest.approx(expected.item(), rel=1e-6)
    # the foreground seeds twice over (same predictions), the background once: a plain mean over seeds would change
    doubled = torch.cat([logits, logits], -1)
    foreground_again = torch.where((seeds > 0) & (seeds != 255), seeds, 255)
    assert balanced_seed_loss(doubled, torch.cat([seeds, foreground_again], -1)).item() == pytest.approx(
        balanced_seed_loss(logits, seeds).item(), rel=1e-6)
    balanced_seed_loss(logits, seeds).backward()
    assert torch.equal(logits.grad.abs().sum(1)[0] > 0, seeds[0] != 255)


def test_boundary_loss_is_zero_when_the_crf_returns_the_prediction():
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 6, 7)
    rgb = torch.randint(0, 256, (2, 48, 56, 3), dtype=torch.uint8)
    no_pairwise = CrfParams(gaussian_compat=0.0, bilateral_compat=0.0)
    assert abs(boundary_loss(logits, rgb, no_pairwise, 1e-4, in_process).item()) < 1e-5


def test_boundary_loss_treats_the_crf_output_as_a_constant_target():
    torch.manual_seed(6)
    logits = torch.randn(2, 4, 6, 7, requires_grad=True)
    rgb = torch.randint(0, 256, (2, 48, 56, 3), dtype=torch.uint8)
    settings = CrfParams(gaussian_sxy=0.25, bilateral_sxy=80 / 12)
    recorded = []

    def recording(function, jobs):
        recorded.extend(function(job) for job in jobs)
        return recorded[-len(jobs):]

    loss = boundary_loss(logits, rgb, settings, 1e-8, recording)
    assert loss.item() > 1e-3
    loss.backward()
    # d KL(R || softmax(z)) / dz = softmax(z) - R per pixel when R is a constant (the floor 1e-8 is not reached)
    targets = torch.from_numpy(np.stack(recorded))
    expected = (torch.softmax(logits.detach(), 1) - targets) / (2 * 6 * 7)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_clipped_distribution_floors_and_renormalises():
    clipped = clipped_distribution(np.array([[1.0], [0.0]]), 0.01)
    assert np.allclose(clipped[:, 0], [1 / 1.01, 0.01 / 1.01])


def zero_outputs(stages=(5, 4, 3), classes=K):
    maps = {"top": torch.zeros(2, classes, 5, 5, requires_grad=True)}
    logits = {"top": torch.zeros(2, classes + 1, 5, 5, requires_grad=True)}
    for stage in stages:
        maps[stage] = torch.zeros(2, classes, 9 if stage == 3 else 5, 9 if stage == 3 else 5, requires_grad=True)
        logits[stage] = torch.zeros(2, classes + 1, 9 if stage == 3 else 5, 9 if stage == 3 else 5)
    return AGENOutputs(maps, logits)


class FixedOutputs:
    def __init__(self, outputs):
        self.fixed = outputs

    def outputs(self, images):
        return self.fixed

    def classification_maps(self, images):
        return self.fixed.class_maps


def batch(size=33):
    labels = torch.zeros(2, K)
    labels[:, 4] = 1
    return {"images": torch.randn(2, 3, size, size), "labels": labels,
            "rgb": torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)}


def test_classification_terms_are_k_log_2_per_head_for_zero_maps():
    loss, parts = tiny_method().training_loss(FixedOutputs(zero_outputs()), batch())
    assert sorted(parts) == ["cls_agm3", "cls_agm4", "cls_agm5", "cls_top", "seed_agm3", "seed_agm4", "seed_agm5",
                             "seed_top", "unseeded_agm3", "unseeded_agm4", "unseeded_agm5", "unseeded_top"]
    for head in ("top", "agm3", "agm4", "agm5"):
        assert parts[f"cls_{head}"] == pytest.approx(K * math.log(2), rel=1e-6)  # 13.863
    assert sum(parts[f"cls_{h}"] for h in ("top", "agm3", "agm4", "agm5")) == pytest.approx(55.452, abs=1e-3)
    assert loss.item() == pytest.approx(sum(v for k, v in parts.items() if not k.startswith("unseeded_")), rel=1e-5)


def test_images_missing_a_class_are_found_and_ignored_on_request():
    seeds = torch.tensor([[[0, 1], [255, 0]], [[0, 0], [255, 3]], [[2, 2], [0, 0]]])
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 1, 0]])
    assert images_missing_a_class(seeds, labels).tolist() == [False, True, False]  # image 1 lacks class 2
    assert images_missing_a_class(torch.full((1, 2, 2), 255), torch.tensor([[0.0, 0, 0]])).tolist() == [False]
    # zero class maps: the labelled class gets no seed, so every pixel is a background seed (the paper's rule,
    # loss log(K + 1) per head) or, with unseeded_images=ignore, no pixel is a seed (loss 0)
    _, paper = tiny_method().training_loss(FixedOutputs(zero_outputs()), batch())
    _, ignored = tiny_method(unseeded_images="ignore").training_loss(FixedOutputs(zero_outputs()), batch())
    for head in ("top", "agm3", "agm4", "agm5"):
        assert paper[f"unseeded_{head}"] == ignored[f"unseeded_{head}"] == 1.0
        assert paper[f"seed_{head}"] == pytest.approx(math.log(K + 1), rel=1e-6)
        assert ignored[f"seed_{head}"] == 0.0
        assert ignored[f"cls_{head}"] == paper[f"cls_{head}"]


def test_the_baseline_logs_one_term_of_each_kind_with_the_boundary():
    method = AGENMethod(AGENParams.model_validate({"model": {"agm_stages": [], "coam_stages": [],
                                                             "crf": {"workers": 1}}}))
    _, parts = method.training_loss(FixedOutputs(zero_outputs(stages=())), batch())
    assert sorted(parts) == ["boundary", "cls_top", "crf_ms", "seed_top", "unseeded_top"]
    assert parts["boundary"] >= 0


def test_warm_up_steps_train_the_classification_terms_alone_then_every_term_joins():
    method = AGENMethod(AGENParams.model_validate({"model": {"agm_stages": [], "coam_stages": [],
                                                             "seg_warmup_steps": 2, "crf": {"workers": 1}}}))
    outputs = zero_outputs(stages=())
    losses = [method.training_loss(FixedOutputs(outputs), batch()) for _ in range(3)]
    for loss, parts in losses[:2]:
        assert parts["seed_top"] == parts["boundary"] == parts["crf_ms"] == 0.0
        assert loss.item() == pytest.approx(parts["cls_top"], rel=1e-6) == K * math.log(2)
    loss, parts = losses[2]
    assert parts["seed_top"] > 0 and parts["crf_ms"] > 0
    assert loss.item() == pytest.approx(parts["cls_top"] + parts["seed_top"] + parts["boundary"], rel=1e-5)


def test_the_classification_loss_falls_as_a_labelled_class_map_rises():
    model, method = tiny_net(agm_stages=(), coam_stages=()), tiny_method(agm_stages=[], coam_stages=[])
    data = batch()
    with torch.no_grad():
        model.cls_head[-1].bias.zero_()
        before = method.training_loss(model, data)[1]["cls_top"]
        model.cls_head[-1].bias[4] = 2.0  # the labelled class's map, 2 higher everywhere
        assert torch.allclose(model(data["images"])[:, 4], model.class_map(data["images"])[:, 4].mean((1, 2)))
        assert method.training_loss(model, data)[1]["cls_top"] < before


# The network (tests 16-20)

@pytest.mark.parametrize("scheme, hidden_std", [("normal", 0.01), ("kaiming", math.sqrt(2 / (64 * 9)))])
def test_new_layer_init_gives_the_hidden_and_the_output_convolutions_their_scales(scheme, hidden_std):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3), torch.nn.ReLU(True)),
                               torch.nn.Conv2d(128, 21, 1))
    init_new_layers(head, scheme)
    assert head[0][0].weight.std().item() == pytest.approx(hidden_std, rel=0.02)  # He: sqrt(2 / fan_in)
    assert head[1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert head[0][0].bias.abs().max() == head[1].bias.abs().max() == 0


@pytest.mark.parametrize("size, grids", [(65, (17, 9)), (61, (16, 8))])
def test_every_head_has_its_shape_for_odd_inputs(size, grids):
    model = tiny_net()
    images = torch.randn(2, 3, size, size)
    outputs = model.outputs(images)
    fine, coarse = grids
    assert model(images).shape == (2, K)
    assert outputs.class_maps["top"].shape == (2, K, coarse, coarse)
    assert outputs.class_maps[3].shape == (2, K, fine, fine)
    assert outputs.class_maps[4].shape == outputs.class_maps[5].shape == (2, K, coarse, coarse)
    assert outputs.seg_logits["top"].shape == (2, K + 1, coarse, coarse)
    assert outputs.seg_logits[3].shape == (2, K + 1, fine, fine)
    assert model.segment(images).shape == (2, K + 1, coarse, coarse)


def test_agm_second_and_last_convs_are_shared_and_first_convs_private():
    model = AGENNet(K, **{**TINY, "width": 1.0, "agm_cls_channels": 256, "agm_seg_channels": 512})
    for heads, expected in ((model.agm_cls, {"3": 256, "4": 512, "5": 512}),
                            (model.agm_seg, {"3": 256, "4": 512, "5": 1024})):
        assert {n: branch[0].in_channels for n, branch in heads.private.items()} == expected
        assert len({id(branch) for branch in heads.private.values()}) == 3


def test_every_agm_runs_through_the_one_shared_pair_of_convs():
    model = tiny_net()
    calls = {"cls": 0, "seg": 0}
    model.agm_cls.shared.register_forward_hook(lambda *_: calls.__setitem__("cls", calls["cls"] + 1))
    model.agm_seg.shared.register_forward_hook(lambda *_: calls.__setitem__("seg", calls["seg"] + 1))
    model.outputs(torch.randn(1, 3, 33, 33))
    assert calls == {"cls": 3, "seg": 3}
    assert [name for name, _ in model.agm_cls.shared.named_parameters()] == ["0.0.weight", "0.0.bias", "1.weight",
                                                                             "1.bias"]


def gradient_norms(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: 0.0 if p.grad is None else p.grad.abs().sum().item() for name, p in model.named_parameters()}


BRANCH_A = ("cls_stages.", "cls_head.", "agm_cls.", "coam.")
BRANCH_B = ("seg_stages.", "seg_top.", "seg_head.", "agm_seg.")


def test_seeding_losses_train_branch_b_and_the_stem_only_and_classification_branch_a_and_the_stem():
    model = tiny_net()
    for module in model.coam.values():
        module.gain.data.fill_(0.5)
    data = batch()
    seeding_only = tiny_method(cls_weight=0.0)
    norms = gradient_norms(model, seeding_only.training_loss(model, data)[0])
    assert all(norms[name] == 0 for name in norms if name.startswith(BRANCH_A))
    assert sum(norms[name] for name in norms if name.startswith("stem.")) > 0
    assert all(sum(norms[n] for n in norms if n.startswith(prefix)) > 0 for prefix in BRANCH_B)
    classification_only = tiny_method(seg_weight=0.0)
    norms = gradient_norms(model, classification_only.training_loss(model, data)[0])
    assert all(norms[name] == 0 for name in norms if name.startswith(BRANCH_B))
    assert all(sum(norms[n] for n in norms if n.startswith(prefix)) > 0 for prefix in BRANCH_A + ("stem.",))


def test_branch_b_output_does_not_depend_on_the_agms_or_branch_a():
    model = tiny_net().eval()
    images = torch.randn(1, 3, 33, 33)
    before = model.segment(images)
    for module in (model.agm_cls, model.agm_seg, model.cls_head, *model.cls_stages):
        for parameter in module.parameters():
            parameter.data.normal_()
    assert torch.equal(model.segment(images), before)
    assert torch.equal(AGENMethod().segmenter(model)(images), before)


def test_ablation_flags_build_the_baseline_and_wire_coam_to_the_nearest_map_above():
    baseline = tiny_net(agm_stages=(), coam_stages=())
    assert set(baseline.outputs(torch.randn(1, 3, 33, 33)).class_maps) == {"top"} and not len(baseline.coam)
    single = tiny_net(agm_stages=(4,), coam_stages=(4,)).eval()
    single.coam["4"].gain.data.fill_(1.0)
    images = torch.randn(1, 3, 33, 33)
    outputs = single.outputs(images)
    raw = single.agm_cls(4, single._branch_features(images)[0][4])
    assert torch.allclose(outputs.class_maps[4], single.coam["4"](raw, outputs.class_maps["top"]), atol=1e-6)
    chain = tiny_net().eval()
    for module in chain.coam.values():
        module.gain.data.fill_(1.0)
    outputs = chain.outputs(images)
    taps = chain._branch_features(images)[0]
    raw4 = chain.agm_cls(4, taps[4])
    assert torch.allclose(outputs.class_maps[4], chain.coam["4"](raw4, outputs.class_maps[5]), atol=1e-6)
    raw3 = chain.agm_cls(3, taps[3])
    assert torch.allclose(outputs.class_maps[3], chain.coam["3"](raw3, outputs.class_maps[4]), atol=1e-6)


def test_parameter_groups_partition_the_network_and_freeze_every_backbone_batchnorm():
    model = tiny_net(agm_lr_mult=7.0)
    groups = model.parameter_groups(3.0)
    named = {group.name: group for group in groups}
    assert sorted(named) == ["agm", "backbone", "gain", "new"]
    ids = [id(p) for group in groups for p in group.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert (named["agm"].lr_mult, named["new"].lr_mult, named["backbone"].lr_mult) == (7.0, 3.0, 1.0)
    assert {id(p) for p in named["agm"].params} == {id(p) for p in [*model.agm_cls.parameters(),
                                                                    *model.agm_seg.parameters()]}
    assert not named["gain"].weight_decay and len(named["gain"].params) == 3
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 30 and batchnorm_layers(model, groups) == norms  # ResNet-38d's, all frozen


def test_branch_a_lr_mult_moves_branch_a_alone_to_groups_at_its_rates():
    model = tiny_net(agm_lr_mult=7.0, branch_a_lr_mult=5.0)
    groups = model.parameter_groups(3.0)
    named = {group.name: group for group in groups}
    assert {name: group.lr_mult for name, group in named.items()} == {
        "backbone": 1.0, "agm": 7.0, "new": 3.0, "gain": 3.0, "branch_a_backbone": 5.0, "branch_a_agm": 35.0,
        "branch_a_new": 15.0}
    ids = [id(p) for group in groups for p in group.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # a partition
    assert {id(p) for p in named["branch_a_backbone"].params} == {id(p) for p in model.cls_stages.parameters()}
    assert {id(p) for p in named["branch_a_new"].params} == {id(p) for p in model.cls_head.parameters()}
    assert {id(p) for p in named["agm"].params} == {id(p) for p in model.agm_seg.parameters()}
    assert not {id(p) for p in model.stem.parameters()} & {id(p) for p in named["branch_a_backbone"].params}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert batchnorm_layers(model, groups) == norms  # branch A's backbone stays frozen under cls.freeze_bn
    plain = tiny_net(agm_lr_mult=7.0)
    assert [group.name for group in plain.parameter_groups(3.0)] == ["backbone", "agm", "new", "gain"]


def test_a_shared_conv1_stem_gives_branch_b_its_own_second_stage():
    model = tiny_net(shared_stem="conv1")
    assert len(model.stem) == 1 and len(model.cls_stages) == len(model.seg_stages) == 4
    assert model(torch.randn(1, 3, 33, 33)).shape == (1, K)


def test_lite0_branches_share_the_stem_and_give_stride_8_maps():
    model = AGENNet(3, cls_backbone="tf_efficientnet_lite0", seg_backbone="tf_efficientnet_lite0",
                    cls_head_channels=16, agm_cls_channels=8, agm_seg_channels=8, seg_head_channels=8)
    outputs = model.outputs(torch.randn(1, 3, 64, 64))
    assert outputs.class_maps["top"].shape == (1, 3, 8, 8) and outputs.class_maps[3].shape == (1, 3, 16, 16)
    assert model.mean == (0.5, 0.5, 0.5) and isinstance(model.seg_adapter, torch.nn.Identity)


# The method

def test_method_refuses_a_coam_without_its_agm_in_one_line():
    params = parse_params({"method": "agen", "cls": {"backbone": "vgg16"},
                           "methods": {"agen": {"model": {"agm_stages": [4], "coam_stages": [3, 4]}}}}, method_params())
    with pytest.raises(ParamsError, match=r"coam_stages \[3, 4\]: a CoAM needs the AGM of its stage"):
        get_method(params)


def test_method_refuses_a_backbone_it_is_not_built_on():
    with pytest.raises(ParamsError, match="cls.backbone 'resnet18': method 'agen' is built on one of: vgg16"):
        get_method(parse_params({"method": "agen", "cls": {"backbone": "resnet18"}}, method_params()))


def test_the_boundary_crf_scales_the_kernel_widths():
    crf = AGENParams().model.crf.at_output_stride()
    assert type(crf) is CrfParams
    assert crf.bilateral_sxy == pytest.approx(80 / 12) and crf.gaussian_sxy == pytest.approx(0.25)
    assert crf.bilateral_compat == 10 and crf.gaussian_compat == 3 and crf.bilateral_srgb == 13
    assert crf.iterations == 10 and crf.workers == 0


def test_feature_resolution_seeds_run_at_each_map_grid(monkeypatch):
    grids = []

    def recording(logits, seeds):
        assert logits.shape[-2:] == seeds.shape[-2:]
        grids.append(tuple(seeds.shape[-2:]))
        return balanced_seed_loss(logits, seeds)

    monkeypatch.setattr(seed_losses, "balanced_seed_loss", recording)  # imported where the loss runs
    _, parts = tiny_method(seed_resolution="feature").training_loss(FixedOutputs(zero_outputs()), batch())
    assert grids == [(5, 5), (5, 5), (5, 5), (9, 9)]  # top, AGM-5, AGM-4, AGM-3 at their own grids
    grids.clear()
    _, at_input = tiny_method().training_loss(FixedOutputs(zero_outputs()), batch())
    assert grids == [(33, 33)] * 4 and set(parts) == set(at_input)
    assert all(math.isfinite(v) for v in parts.values())


def test_topk_fraction_counts_only_the_photo_and_padding_stays_void():
    probabilities = torch.arange(10.0).reshape(1, 1, 2, 5) / 10
    probabilities = torch.cat([1 - probabilities, probabilities], 1)
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, 1, 3:] = False  # the two highest values are padding
    seeds = threshold_seeds(probabilities, valid, 0.25, "topk_frac")[0].flatten().tolist()
    assert seeds == [0, 0, 255, 255, 255, 255, 1, 1, 255, 255]


def test_padding_never_sets_the_maximum_of_a_class_map():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 0, 0], maps[0, 0, 3, 3] = 1.0, 4.0
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 3, 3] = False
    probabilities = seed_probabilities(maps, torch.ones(1, 1), (4, 4), alpha=8.0, valid=valid)
    assert probabilities[0, 1, 0, 0] == pytest.approx(1.0, abs=1e-4) and probabilities[0, 1, 3, 3] == 0


def test_method_refuses_a_stage_named_twice_and_a_conv1_stem_across_families():
    with pytest.raises(ParamsError, match="a stage is named twice"):
        get_method(parse_params({"method": "agen", "cls": {"backbone": "vgg16"},
                                 "methods": {"agen": {"model": {"agm_stages": [4, 4]}}}}, method_params()))
    with pytest.raises(ParamsError, match="shared_stem conv1: cls.backbone vgg16 and seg_backbone "
                                          "tf_efficientnet_lite0 end stage 1 at different strides"):
        get_method(parse_params({"method": "agen", "cls": {"backbone": "vgg16"}, "methods": {"agen": {"model": {
            "shared_stem": "conv1", "seg_backbone": "tf_efficientnet_lite0"}}}}, method_params()))


def os_pid_and_square(job: tuple[int]) -> tuple[int, int]:
    return os.getpid(), job[0] ** 2


def test_worker_pool_returns_results_in_order_from_other_processes():
    pool = WorkerPool(2)
    try:
        results = pool.map(os_pid_and_square, [(n,) for n in range(6)])
        assert [square for _, square in results] == [n * n for n in range(6)]
        assert os.getpid() not in {pid for pid, _ in results}
        assert pool.map(os_pid_and_square, [(3,)]) == [(os.getpid(), 9)]  # one job: no round trip
    finally:
        pool.close()


def test_the_warm_up_until_onset_holds_the_seeding_loss_back_until_the_onset_is_confirmed():
    """A seeded step 2 that the next step undoes (a fresh branch A's maps) is no onset; steps 4-8 are seeded, so the
    onset is step 4, confirmed at step 8: steps 1-8 warm up (seed loss 0), step 9 seeds although its maps are blank
    again (every pixel a background seed: a positive loss)."""
    method = AGENMethod(AGENParams.model_validate({"model": {"agm_stages": [], "coam_stages": [], "width": 1 / 16,
                                                             "seg_warmup_until_onset": True, "boundary_weight": 0.0}}))
    blank, seeded = zero_outputs(stages=()), zero_outputs(stages=())
    seeded.class_maps["top"] = torch.zeros(2, K, 5, 5)
    seeded.class_maps["top"][:, 4, 1:4, 1:4] = 1.0
    steps = (blank, seeded, blank, *[seeded] * SEED_ONSET_STEPS, blank)
    losses = [method.training_loss(FixedOutputs(outputs), batch())[1]["seed_top"] for outputs in steps]
    assert SEED_ONSET_STEPS == 5 and losses[:8] == [0.0] * 8 and losses[8] > 0
    assert method.learned_values(tiny_net(agm_stages=(), coam_stages=()))["seed_onset_step"] == 4.0
    with pytest.raises(ParamsError, match="seg_warmup_until_onset: each process would see its own onset"):
        get_method(parse_params({"method": "agen", "dist": {"nproc": 2}, "cls": {"backbone": "vgg16"},
                                 "methods": {"agen": {"model": {"seg_warmup_until_onset": True}}}}, method_params()))


def test_the_seed_onset_is_the_first_of_five_seeded_steps_in_a_row_warm_up_included():
    """Steps 1-2: zero class maps, the labelled class gets no seed in either image (unseeded 1.0); step 3 seeded
    and step 4 blank (no onset: the run of seeded steps breaks); from step 5 the map is positive on a square in
    every step, so both images are seeded (unseeded 0.0): the onset is step 5, known at step 9, measured while the
    warm-up (12 steps) still keeps the seeding loss at 0."""
    method = AGENMethod(AGENParams.model_validate({"model": {"agm_stages": [], "coam_stages": [], "width": 1 / 16,
                                                             "seg_warmup_steps": 12, "boundary_weight": 0.0}}))
    blank, seeded = zero_outputs(stages=()), zero_outputs(stages=())
    seeded.class_maps["top"] = torch.zeros(2, K, 5, 5)
    seeded.class_maps["top"][:, 4, 1:4, 1:4] = 1.0
    model = tiny_net(agm_stages=(), coam_stages=())
    shares = []
    for step, outputs in enumerate((blank, blank, seeded, blank, *[seeded] * 5, blank), 1):
        _, parts = method.training_loss(FixedOutputs(outputs), batch())
        shares.append(parts["unseeded_top"])
        assert parts["seed_top"] == 0.0  # warming up
        if step == 8:
            assert "seed_onset_step" not in method.learned_values(model)
    assert shares == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert method.learned_values(model)["seed_onset_step"] == 5.0


def test_classification_maps_are_the_training_forwards_class_maps_without_branch_b():
    model = tiny_net()
    for stage, coam in model.coam.items():
        coam.gain.data.fill_(0.1 * int(stage))  # a live CoAM chain
    images = torch.randn(2, 3, 40, 40)
    alone, joint = model.classification_maps(images), model.outputs(images).class_maps
    assert list(alone) == list(joint) == ["top", 5, 4, 3]
    for key in joint:
        assert torch.equal(alone[key], joint[key])
    branch_b = {id(p) for module in (model.seg_stages, model.seg_top, model.seg_head, model.agm_seg, model.seg_adapter)
                for p in module.parameters()}
    trained = model.classification_parameters()
    assert not trained & branch_b and trained | branch_b == {id(p) for p in model.parameters()}


def test_the_warm_start_trains_the_classification_parameters_alone_on_its_own_lr_and_epochs():
    cls = ClsParams(backbone="vgg16", lr=0.001, epochs=5, new_layer_lr_mult=10.0, optimizer="sgd")
    model = tiny_net()
    assert tiny_method().warm_start(model, cls) is None  # the paper's joint training from the first step
    phase = tiny_method(warm_start_epochs=3, warm_start_lr=0.02).warm_start(model, cls)
    assert (phase.recipe.epochs, phase.recipe.lr, phase.recipe.optimizer) == (3, 0.02, "sgd")
    assert tiny_method(warm_start_epochs=1).warm_start(model, cls).recipe.lr == 0.001  # cls.lr
    assert {id(p) for group in phase.groups for p in group.params} == model.classification_parameters()
    rates = {group.name: (group.lr_mult, group.weight_decay) for group in phase.groups}
    assert rates == {"backbone": (1.0, True), "agm": (10.0, True), "new": (10.0, True), "gain": (10.0, False)}


def test_the_warm_start_loss_is_the_classification_part_and_its_steps_precede_the_seg_warm_up():
    """Two warm-start steps on zero maps give K log 2 per class map and no seed loss; their unseeded_top counts
    towards the onset, while seg_warmup_steps=1 counts the joint steps after them: joint step 1 still warms up,
    joint step 2 seeds."""
    method = tiny_method(warm_start_epochs=1, seg_warmup_steps=1)
    outputs = FixedOutputs(zero_outputs())
    for _ in range(2):
        loss, parts = method.warm_start_loss(outputs, batch())
        assert sorted(parts) == ["cls_agm3", "cls_agm4", "cls_agm5", "cls_top", "unseeded_top"]
        assert parts["unseeded_top"] == 1.0 and loss.item() == pytest.approx(4 * K * math.log(2), rel=1e-6)
    joint = [method.training_loss(outputs, batch())[1] for _ in range(2)]
    assert joint[0]["seed_top"] == 0.0 and joint[1]["seed_top"] == pytest.approx(math.log(K + 1), rel=1e-6)
    assert {key: joint[0][key] for key in parts if key.startswith("cls_")} == {
        key: value for key, value in parts.items() if key.startswith("cls_")}
