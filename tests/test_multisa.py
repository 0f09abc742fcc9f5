"""Multi-SA (spec ../shared/methods/multisa.md, section 8): the attention block, the stacking, the head's
identities, the parameter count, the optimizer groups and the method's hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.config import ClsParams, parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import get_method, method_params
from wsss_core.models import multisa as multisa_module
from wsss_core.models.backbones import Backbone
from wsss_core.models.cam_net import CamNet
from wsss_core.models.multisa import MultiSANet, SelfAttention
from wsss_core.training import build_optimizer


def _block(channels: int = 8, beta: float = 0.5, **kwargs) -> SelfAttention:
    torch.manual_seed(0)
    block = SelfAttention(channels, **kwargs)
    with torch.no_grad():
        block.beta.fill_(beta)
    return block


def _net(layers: int = 3, backbone: str = "resnet18", output_stride: int = 16, classes: int = 5, **kwargs) -> MultiSANet:
    torch.manual_seed(0)
    return MultiSANet(Backbone(backbone, output_stride), classes, layers=layers, **kwargs).eval()


def test_attention_rows_are_distributions_over_the_keys():
    features = torch.randn(2, 8, 5, 7)
    attention = _block().attention(features)
    assert attention.shape == (2, 35, 35) and attention.min() >= 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 35), atol=1e-6, rtol=0)


def test_block_equals_a_naive_implementation_of_equations_1_to_5():
    features = torch.randn(2, 8, 4, 5) * 0.3
    block = _block(beta=0.7)
    x = features.flatten(2).double()  # [B, c, N]
    wq, wk, wv = (conv.weight[:, :, 0, 0].double() for conv in (block.query, block.key, block.value))
    queries, keys, values = (torch.einsum("oc,bcn->bon", w, x) for w in (wq, wk, wv))
    scores = torch.einsum("bci,bcj->bij", queries, keys)  # S = Q^T K, no 1/sqrt(d)
    attention = scores.exp() / scores.exp().sum(-1, keepdim=True)  # softmax over the keys j
    output = torch.einsum("bij,bcj->bci", attention, values)  # O[:, i] = sum_j A[i, j] U[:, j]
    expected = (0.7 * output + x).reshape(features.shape)
    torch.testing.assert_close(block(features).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block.attention(features).double(), attention, atol=1e-6, rtol=1e-5)


def test_sqrt_d_scale_divides_the_logits():
    features = torch.randn(1, 8, 3, 3)
    plain, scaled = _block(), _block(scale="sqrt_d")
    logits = torch.log(plain.attention(features))
    expected = torch.softmax(logits / np.sqrt(8), -1)  # log-softmax differs from the logits by a per-row constant
    torch.testing.assert_close(scaled.attention(features), expected, atol=1e-5, rtol=1e-4)


def test_beta_zero_is_the_identity_and_the_projections_get_no_gradient():
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    block = _block(beta=0.0)
    output = block(features)
    assert torch.equal(output, features)
    (output * torch.randn_like(output)).sum().backward()
    for conv in (block.query, block.key, block.value):
        assert torch.count_nonzero(conv.weight.grad) == 0
    assert block.beta.grad.abs() > 0 and block.beta.numel() == 1


def test_attention_is_equivariant_to_a_permutation_of_the_pixels():
    features = torch.randn(1, 8, 4, 6)
    block = _block()
    permutation = torch.randperm(24)
    permuted = features.flatten(2)[:, :, permutation].reshape(1, 8, 3, 8)  # any h x w with the same N
    torch.testing.assert_close(block(permuted).flatten(2), block(features).flatten(2)[:, :, permutation],
                               atol=1e-6, rtol=1e-5)


def test_spatially_constant_values_are_returned_unchanged():
    features = torch.randn(1, 8, 1, 1).expand(1, 8, 5, 5).contiguous()
    block = _block()
    values = block.value(features)
    torch.testing.assert_close(block.attend(features), values, atol=1e-6, rtol=1e-5)


def test_chunked_attention_equals_the_whole_matrix(monkeypatch):
    features = torch.randn(2, 8, 5, 5)
    block = _block()
    whole = block(features)
    monkeypatch.setattr(multisa_module, "ATTENTION_CHUNK", 7)
    torch.testing.assert_close(block(features), whole, atol=1e-6, rtol=1e-6)


def test_stack_keeps_v1_bit_exact_in_order_at_its_size_for_odd_sizes():
    net = _net()
    taps = [torch.randn(1, 128, 7, 5), torch.randn(1, 256, 4, 3), torch.randn(1, 512, 4, 3)]
    stacked = net.stacked(taps)
    assert stacked.shape == (1, 896, 7, 5)
    assert torch.equal(stacked[:, :128], taps[0])
    torch.testing.assert_close(stacked[:, 128:384], F.interpolate(taps[1], (7, 5), mode="bilinear"))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_resize_preserves_the_mean_for_integer_factors(factor):
    tap = torch.randn(1, 3, 4, 5)
    resized = F.interpolate(tap, scale_factor=factor, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized.mean((2, 3)), tap.mean((2, 3)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers, stride, channels", [(0, 16, 512), (1, 16, 512), (2, 16, 768), (3, 8, 896)])
def test_layers_choose_the_last_taps_and_the_cam_stride(layers, stride, channels):
    net = _net(layers)
    images = torch.randn(2, 3, 67, 45)  # odd sizes
    with torch.no_grad():
        logits, (raw, shares), fused = net(images), net.layer_cams(images), net.fused(images)
    size = (-(-67 // stride), -(-45 // stride))
    assert net.cam_stride == stride and fused.shape == (2, channels, *size) and raw.shape == (2, 5, *size)
    assert logits.shape == (2, 5) and len(shares) == max(layers, 1) and len(net.gates()) == layers
    # linear, bias-free head: logits = GAP(raw CAM); the taps' shares add up to the raw CAM
    torch.testing.assert_close(logits, raw.mean((2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sum(shares), raw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net.cams(images), F.relu(raw), atol=1e-5, rtol=1e-4)


def test_zero_layers_is_the_plain_cam_network_on_the_same_weights():
    torch.manual_seed(1)
    plain = CamNet(Backbone("resnet18", 16), 5).eval()
    net = _net(0)
    net.load_state_dict(plain.state_dict())  # strict: the same parameters under the same names
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(net(images), plain(images)) and torch.equal(net.cams(images), plain.cams(images))


def test_gates_at_zero_make_the_network_blind_to_the_projections():
    net = _net(3)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(images)
        for block in net.blocks:
            for conv in (block.query, block.key, block.value):
                conv.weight.normal_()
        assert torch.equal(net(images), before)


def test_inline_feeds_the_attended_tap_to_the_next_stage():
    side, inline = _net(3), _net(3, inline=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(side(images), inline(images))  # beta = 0: both are the plain backbone
        for net in (side, inline):
            net.blocks[0].beta.fill_(0.5)
        side_taps, inline_taps = side.attended_taps(images), inline.attended_taps(images)
    torch.testing.assert_close(side_taps[0], inline_taps[0])  # V_1 alike
    assert not torch.allclose(side_taps[2], inline_taps[2])  # the deeper stages saw V_1 inline


def test_eval_forward_is_deterministic():
    net = _net(3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.cams(images), net.cams(images))


def _added_parameters(net: MultiSANet) -> int:
    return sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in net.backbone.parameters())


def test_added_parameters_follow_the_spec_formula():
    # 3 (c_l^2) projections per tap + c*^2 fuse + c* C classifier + one beta per tap, no biases (spec 2.7)
    for backbone, channels in (("resnet18", (128, 256, 512)), ("tf_efficientnet_lite0", (40, 112, 1280))):
        stacked = sum(channels)
        expected = 3 * sum(c * c for c in channels) + stacked ** 2 + stacked * 20 + 3
        assert _added_parameters(_net(3, backbone, classes=20)) == expected
    # ResNet-50 / ResNeSt-101 taps 512/1024/2048: projections 16,515,072 + fuse 12,845,056 = 29,360,128
    assert 3 * (512 ** 2 + 1024 ** 2 + 2048 ** 2) + 3584 ** 2 == 29_360_128
    assert _added_parameters(_net(3, "resnet50", classes=20)) == 29_360_128 + 3584 * 20 + 3


def test_biases_and_gates_take_no_weight_decay_and_new_layers_ten_times_the_lr():
    net = _net(3, sa_bias=True, fuse_bias=True)
    params = parse_params({"method": "multisa", "cls": {"lr": 0.1, "weight_decay": 1e-4, "nesterov": True}},
                          method_params())
    optimizer = build_optimizer(net.parameter_groups(10.0), params.cls)
    by_name = {group["name"]: group for group in optimizer.param_groups}
    expected = {"backbone": (0.1, 1e-4), "backbone_bias": (0.2, 0.0), "new": (1.0, 1e-4), "new_bias": (2.0, 0.0),
                "gates": (1.0, 0.0)}
    assert set(by_name) == set(expected)
    for name, (lr, weight_decay) in expected.items():
        assert by_name[name]["lr"] == pytest.approx(lr) and by_name[name]["weight_decay"] == weight_decay, name
    gate_ids = {id(block.beta) for block in net.blocks}
    assert {id(p) for p in by_name["gates"]["params"]} == gate_ids and by_name["gates"]["nesterov"]
    for name, parameter in net.named_parameters():
        group = next(g for g in optimizer.param_groups if any(p is parameter for p in g["params"]))
        assert (group["weight_decay"] == 0.0) == (name.endswith("bias") or id(parameter) in gate_ids), name


def test_gates_are_unconstrained():
    features = torch.rand(1, 8, 4, 4)
    block = _block(beta=0.0)
    attended = block.attend(features).detach()
    optimizer = torch.optim.SGD([block.beta], lr=1.0)
    (block(features) * attended).sum().backward()  # d/d beta = |O|^2 > 0: the step drives beta below zero
    optimizer.step()
    beta = float(block.beta.detach())
    assert beta == pytest.approx(-float((attended ** 2).sum()), rel=1e-5)
    torch.testing.assert_close(block(features), features + beta * attended)  # the forward uses it unclamped


def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch():
    net = _net(3).train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1, 0]] * 4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = F.multilabel_soft_margin_loss(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_method_exports_per_layer_cams_and_its_gates():
    params = parse_params({"method": "multisa"}, method_params())
    method = get_method(params)
    net = method.build_classifier(ClsParams(backbone="resnet18"), 5, pretrained=False).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = method.cam_maps(net, images)
        raw, shares = net.layer_cams(images)
    assert list(maps) == ["cam", "cam_sa1", "cam_sa2", "cam_sa3"] and all((m >= 0).all() for m in maps.values())
    torch.testing.assert_close(maps["cam_sa2"], F.relu(shares[1]))
    assert method.learned_values(net) == {"beta_sa1": 0.0, "beta_sa2": 0.0, "beta_sa3": 0.0}


def test_bad_model_params_are_one_line_errors():
    with pytest.raises(ParamsError, match=r"methods\.multisa\.model\.layers"):
        parse_params({"method": "multisa", "methods": {"multisa": {"model": {"layers": 4}}}}, method_params())
    with pytest.raises(ParamsError, match=r"methods\.multisa\.model\.scale"):
        parse_params({"method": "multisa", "methods": {"multisa": {"model": {"scale": "cosine"}}}}, method_params())


@pytest.mark.parametrize("biases", [False, True])
def test_collapsed_head_equals_the_fuse_conv_pixel_by_pixel(biases):
    net = _net(3, fuse_bias=biases, classifier_bias=biases)
    if biases:
        with torch.no_grad():
            net.fuse.bias.normal_()
            net.classifier.bias.normal_()
    images = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        fused = net.fused(images)  # Theta, pixel by pixel (eq. 7)
        raw, shares = net.layer_cams(images)
        torch.testing.assert_close(net(images), net.classifier(fused.mean((2, 3), keepdim=True)).flatten(1),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(raw, net.classifier(fused), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(net.cams(images), F.relu(net.classifier(fused)), atol=1e-4, rtol=1e-4)
        bias = net.classifier.bias + net.classifier.weight.flatten(1) @ net.fuse.bias if biases else 0
        torch.testing.assert_close(sum(shares) + (bias.view(1, -1, 1, 1) if biases else 0), raw, atol=1e-4, rtol=1e-4)


def test_every_model_knob_is_an_argument_of_the_network():
    """build_classifier passes each knob by name: a knob the network does not take (or one the method forgets
    to pass) fails here rather than being dropped."""
    import inspect

    from wsss_core.methods.multisa import MultiSAMethod, MultiSAModelParams
    from wsss_core.models.multisa import MultiSANet

    arguments = set(inspect.signature(MultiSANet.__init__).parameters) - {"self", "backbone", "num_classes"}
    assert set(MultiSAModelParams.model_fields) == arguments
    source = inspect.getsource(MultiSAMethod.build_classifier)
    assert all(f"{name}=model.{name}" in source for name in arguments)


def _tap_energies(net: MultiSANet, images: torch.Tensor) -> list[float]:
    """Return each stacked tap's mean squared value per channel and pixel, finest first."""
    with torch.no_grad():
        return [float(tap.pow(2).mean()) for tap in net.attended_taps(images)]


def test_tap_norm_bounds_each_taps_scale_whatever_the_input():
    """Gates at 0 (the blocks are the identity), BatchNorm in training mode: with bn_relu each tap channel is
    normalised over the batch, then ReLU'd, so its mean square is at most 1 even on images scaled by 100; the
    raw taps of the same backbone scale with the input (ResNet-18, random: thousands)."""
    images = 100 * torch.randn(4, 3, 64, 64)
    raw, normed = _net(3), _net(3, tap_norm="bn_relu").train()
    assert max(_tap_energies(raw, images)) > 100
    energies = _tap_energies(normed, images)
    assert len(energies) == 3 and all(0.2 < energy <= 1.0 + 1e-4 for energy in energies), energies


def test_tap_norm_is_off_for_the_plain_cam_network_and_refused_with_inline():
    assert _net(0, tap_norm="bn_relu").tap_norms is not None and len(_net(0, tap_norm="bn_relu").tap_norms) == 0
    with pytest.raises(ValueError, match="tap_norm"):
        _net(3, tap_norm="bn_relu", inline=True)
    params = parse_params({"method": "multisa", "methods": {"multisa": {"model": {"tap_norm": "bn_relu",
                                                                                  "inline": True}}}}, method_params())
    with pytest.raises(ParamsError, match=r"methods\.multisa\.model\.tap_norm"):
        get_method(params)


def test_the_sqrt_d_scale_raises_the_attentions_entropy_on_peaked_logits():
    """Hand-made features whose query-key logits are large: dividing them by sqrt(d) = sqrt(8) flattens every
    row, so its entropy rises (1/sqrt(d) scaling is the transformer's; the paper has none)."""
    features = 3 * torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    entropy = (lambda rows: float(-(rows * rows.clamp(min=1e-30).log()).sum(-1).mean()))
    with torch.no_grad():
        plain, scaled = _block().attention(features), _block(scale="sqrt_d").attention(features)
    assert entropy(plain) == pytest.approx(0.0917, abs=1e-3)  # nats; uniform rows: log 16 = 2.77
    assert entropy(scaled) == pytest.approx(0.2389, abs=1e-3)
