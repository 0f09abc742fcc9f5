"""The improved Conformer (`models/conformer_ms.py`) and its efficient attention: the spec's section-8 model tests
(../shared/methods/conformer.md) on tiny configurations (D = 32, 64 x 64 inputs unless a size is the point),
checkpoint loading from the official layout and the Etrans efficiency bounds."""
from __future__ import annotations

import pytest
import torch
from timm.layers.attention import Attention
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.conformer import (
    ETRANS_PRESETS, TRANSCAM_SWITCHES, Conformer, EfficientAttention, conformer_cpu, conformer_s,
    load_conformer_weights,
)
from wsss_core.models.conformer_ms import (
    CSConv, ConformerMS, DeformableAttention, PyramidGenerator, build_conformer_ms, count_macs, merge_levels,
    reference_points, split_levels,
)
from wsss_core.models.hooks import attention_probabilities, explicit_attention

torch.set_num_threads(1)

VOC_CLASSES = 21
TINY = dict(num_classes=VOC_CLASSES, embed_dim=32, num_heads=2, depth=3, mfuc_heads=2, pyramid_channels=(8, 16, 16))
TINY_ETRANS = {"sr_ratio": 2, "splits": 2}
TRANSFORMER_PREFIXES = ("cls_token", "conv1.", "bn1.", "trans_patch_conv.", "trans_1.", "trans_norm.")


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def tiny(**switches) -> ConformerMS:
    torch.manual_seed(0)
    return ConformerMS(**{**TINY, "etrans": TINY_ETRANS, **switches}).eval()


def attention_pair(dim: int = 32, heads: int = 2, **options) -> tuple[EfficientAttention, torch.Tensor]:
    """Return (an EfficientAttention, random tokens [2, 1 + 4 * 5, dim] for the grid (4, 5))."""
    torch.manual_seed(0)
    return EfficientAttention(dim, heads, **options), torch.randn(2, 1 + 4 * 5, dim)


# shapes


@torch.no_grad()
@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("switches", [{}, {"mfuc": False}, {"csconv": False}, {"etrans": None}])
def test_outputs_through_both_branches(size, switches):
    model = tiny(**switches)
    images = torch.randn(1, 3, size, size)
    conv_logits, trans_logits, cam_logits = model(images)
    assert conv_logits.shape == trans_logits.shape == (1, VOC_CLASSES)
    assert cam_logits.shape == (1, VOC_CLASSES, size // 32, size // 32)
    torch.testing.assert_close(conv_logits, cam_logits.mean((2, 3)))
    cam, attention = model.cam_and_attention(images)
    tokens = 1 + (size // 16) ** 2
    assert cam.shape == (1, VOC_CLASSES, size // 16, size // 16)  # brought to the token grid
    assert attention.shape == (3, 1, tokens, tokens) and attention.dtype == torch.float32
    assert attention.min() >= 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 1, tokens))


@torch.no_grad()
def test_cam_stride_16_fuses_on_the_token_grid():
    model = tiny(cam_stride=16)
    images = torch.randn(2, 3, 64, 96)
    cam_logits = model(images)[2]
    assert cam_logits.shape == (2, VOC_CLASSES, 4, 6) and model.cam_stride == 16
    assert torch.equal(model.cam_and_attention(images)[0], cam_logits)


@torch.no_grad()
@pytest.mark.parametrize("size", [80, 112])
def test_odd_token_grids_run_and_the_32_level_rounds_up(size):
    """Spec test 5: H/16 odd (5 or 7 tokens a side) also exercises the replicated padding of the 1x2 key pooling."""
    model = tiny()
    cam_logits = model(torch.randn(1, 3, size, size))[2]
    assert cam_logits.shape[-2:] == (-(-size // 32), -(-size // 32))
    cam, attention = model.cam_and_attention(torch.randn(1, 3, size, size))
    tokens = 1 + (size // 16) ** 2
    assert cam.shape[-2:] == (size // 16, size // 16) and attention.shape[-2:] == (tokens, tokens)
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.randn(1, 3, size + 8, size))


def test_one_shared_alpha_and_a_later_first_coupling():
    model = tiny(mfuc_separate_alpha=False, mfuc_start=3, mfuc_alpha_init=0.5)
    assert model.conv_trans_2.mfuc is None and model.conv_trans_3.mfuc is not None
    coupling = model.conv_trans_3.mfuc
    assert coupling.alpha_c is coupling.alpha_x and torch.equal(coupling.alpha_x, torch.full_like(coupling.alpha_x, 0.5))


def test_the_modules_each_switch_builds():
    full, fcu, no_csconv = tiny(), tiny(mfuc=False), tiny(csconv=False)
    assert full.conv_trans_2.mfuc is not None and full.conv_trans_3.csconv is not None and full.csconv_1 is not None
    assert fcu.conv_trans_2.mfuc is None and fcu.conv_trans_2.fcu and hasattr(fcu.conv_trans_2, "squeeze_block")
    assert no_csconv.csconv_1 is None and no_csconv.conv_trans_2.csconv is None
    layout = ConformerMS(**{**TINY, "depth": 6, "mfuc_every": 3})
    assert [getattr(layout, f"conv_trans_{i}").mfuc is not None for i in range(2, 7)] == [True, False, False, True,
                                                                                       False]


def test_pyramid_token_count_and_level_round_trip():
    pyramid = PyramidGenerator(32, (8, 16, 16)).eval()
    with torch.no_grad():
        tokens, shapes = pyramid(torch.randn(2, 64, 56, 56))  # the stem of a 224 input
    assert shapes == [(28, 28), (14, 14), (7, 7)] and tokens.shape == (2, 1029, 32)
    assert torch.equal(merge_levels(split_levels(tokens, shapes)), tokens)


# efficient attention


def test_efficient_attention_shapes_for_both_compressions_and_odd_grids():
    attention = EfficientAttention(32, 2, sr_ratio=2, splits=4)
    tokens = torch.randn(2, 1 + 5 * 7, 32)
    queries, keys, values = attention.heads(tokens, (5, 7))
    assert queries.shape == (2, 8, 36, 4) and keys.shape == values.shape == (2, 8, 1 + 5 * 4, 4)
    output, probabilities = attention(tokens, (5, 7), return_attention=True)
    assert output.shape == tokens.shape and probabilities.shape == (2, 8, 36, 21)
    pvt = EfficientAttention(32, 2, sr_mode="pool2x2", splits=4)
    assert pvt.heads(torch.randn(2, 1 + 4 * 6, 32), (4, 6))[1].shape == (2, 8, 1 + 2 * 3, 4)  # N / 4
    assert pvt.heads(tokens, (5, 7))[1].shape == (2, 8, 1 + 3 * 4, 4)


@pytest.mark.parametrize("options", [{}, {"split_mode": "spatial"}, {"sr_mode": "pool2x2"}, {"scale": "split"}])
def test_attention_rows_are_distributions_and_the_explicit_path_matches(options):
    attention, tokens = attention_pair(**options)
    output, probabilities = attention(tokens, (4, 5), return_attention=True)
    assert probabilities.min() >= 0
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(probabilities.shape[:-1]))
    torch.testing.assert_close(output, attention(tokens, (4, 5)), rtol=1e-5, atol=1e-6)


def test_without_compression_or_split_it_is_timms_attention():
    attention, tokens = attention_pair(sr_ratio=1, splits=1)
    reference = Attention(32, 2, qkv_bias=True)
    reference.load_state_dict(attention.state_dict())
    assert set(attention.state_dict()) == set(reference.state_dict())
    output, probabilities = attention(tokens, (4, 5), return_attention=True)
    torch.testing.assert_close(output, reference(tokens), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probabilities, attention_probabilities(reference, tokens))


def test_channel_split_is_mhsa_with_heads_times_splits_heads_at_the_head_width_scale():
    attention, tokens = attention_pair(32, 2, sr_ratio=1, splits=4)  # d = 16, sub-heads of width 4
    reference = Attention(32, 8, qkv_bias=True)
    reference.load_state_dict(attention.state_dict())
    reference.scale = 16 ** -0.5  # d^-0.5, not (d / s)^-0.5 = 4^-0.5
    reference_output, reference_probabilities = explicit_attention(reference, tokens)
    output, probabilities = attention(tokens, (4, 5), return_attention=True)
    torch.testing.assert_close(probabilities, reference_probabilities)
    torch.testing.assert_close(output, reference_output, rtol=1e-5, atol=1e-6)
    reference.scale = 4 ** -0.5
    torch.testing.assert_close(EfficientAttention(32, 2, sr_ratio=1, splits=4, scale="split").scale, reference.scale)


def test_pooled_key_j_is_the_mean_of_tokens_2j_and_2j_plus_1():
    attention = EfficientAttention(8, 1, sr_ratio=2, splits=1)
    tokens = torch.randn(2, 1 + 3 * 5, 8)
    pooled = attention.compress(tokens, (3, 5))  # odd width: the last key is the last token (replicated)
    grid = tokens[:, 1:].unflatten(1, (3, 5))
    expected = torch.cat([(grid[:, :, 0:4:2] + grid[:, :, 1:4:2]) / 2, grid[:, :, 4:]], 2).flatten(1, 2)
    assert torch.equal(pooled[:, 0], tokens[:, 0])  # the cls token, uncompressed
    torch.testing.assert_close(pooled[:, 1:], expected)
    index, counts, compressed = attention.key_index((3, 5))
    assert compressed == (3, 3) and counts.tolist() == [2, 2, 1] * 3 and index[:5].tolist() == [0, 0, 1, 1, 2]


def test_with_constant_values_the_output_does_not_depend_on_the_compression():
    outputs = []
    for ratio in (1, 2, 4):
        attention, tokens = attention_pair(sr_ratio=ratio, splits=2)
        with torch.no_grad():  # values constant over the tokens: zero value weights, a value bias
            attention.qkv.weight[64:].zero_()
            attention.qkv.bias[64:].normal_()
        outputs.append(attention(tokens, (4, 5)))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])


@pytest.mark.parametrize("options", [{}, {"split_mode": "spatial"}, {"sr_mode": "pool2x2"}])
def test_expanded_attention_keeps_row_sums_and_splits_each_key_evenly(options):
    attention, tokens = attention_pair(**options)
    grid = (4, 5)
    probabilities = attention(tokens, grid, return_attention=True)[1]
    expanded = attention.expand_keys(probabilities, grid)
    assert expanded.shape == (2, attention.maps, 21, 21) and expanded.min() >= 0
    torch.testing.assert_close(expanded.sum(-1), torch.ones(2, attention.maps, 21))
    index, counts, _ = attention.key_index(grid)
    for patch in range(20):  # column of patch p = its key's column / the key's source count
        key = index[patch]
        torch.testing.assert_close(expanded[..., 1 + patch], probabilities[..., 1 + key] / counts[key])
    torch.testing.assert_close(attention.attention_map(tokens, grid), expanded.mean(1))


def test_spatial_split_attends_within_the_query_band_only():
    attention, tokens = attention_pair(splits=2, split_mode="spatial")  # grid 4 x 5 -> keys 4 x 3, bands of 2 rows
    probabilities = attention(tokens, (4, 5), return_attention=True)[1]
    assert probabilities.shape == (2, 2, 21, 13)
    top_queries, top_keys = 1 + torch.arange(10), 1 + torch.arange(6)
    assert probabilities[:, :, top_queries][..., 7:].abs().max() == 0  # bottom keys unseen by the top rows
    assert probabilities[:, :, 11:][..., top_keys].abs().max() == 0
    assert probabilities[:, :, 0].min() > 0 and probabilities[..., 0].min() > 0  # cls sees all, all see cls
    assert attention.matmul_macs(2, (4, 5)) == 2 * 2 * (13 + 20 * (1 + 6)) * 32


def test_parameter_counts_and_attention_matmul_cost():
    standard = Attention(384, 6, qkv_bias=True)
    assert parameter_count(EfficientAttention(384, 6)) == parameter_count(standard)
    narrow = EfficientAttention(384, 6, inner_dim=96)
    weights = standard.qkv.weight.numel() + standard.proj.weight.numel()
    assert parameter_count(narrow) == weights // 4 + 3 * 96 + 384  # 1/4 of the weights plus the biases
    tokens, keys = 1 + 14 * 14, 1 + 14 * 7
    assert EfficientAttention(384, 6).matmul_macs(1, (14, 14)) == 2 * tokens * keys * 384
    assert EfficientAttention(384, 6, sr_ratio=1, splits=1).matmul_macs(1, (14, 14)) == 2 * tokens ** 2 * 384


# MFUC


@torch.no_grad()
def test_mfuc_is_the_identity_at_initialisation():
    model = tiny()
    images = torch.randn(2, 3, 64, 64)
    coupled = model(images)
    for index in (2, 3):
        getattr(model, f"conv_trans_{index}").mfuc = None
    for with_mfuc, without in zip(coupled, model(images)):
        torch.testing.assert_close(with_mfuc, without, rtol=0, atol=0)


def test_deformable_attention_with_zero_offsets_and_identity_projections_samples_pixel_centres():
    torch.manual_seed(0)
    attention = DeformableAttention(8, heads=2, levels=1, points=1)
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.zero_()
        for linear in (attention.value_proj, attention.output_proj):
            linear.weight.copy_(torch.eye(8))
            linear.bias.zero_()
    shapes = [(3, 5)]
    values = torch.randn(2, 15, 8)
    output = attention(torch.randn(2, 15, 8), reference_points(shapes, values.device), values, shapes)
    torch.testing.assert_close(output, values, rtol=1e-5, atol=1e-6)


def test_deformable_attention_weights_sum_to_one_and_offsets_start_directional():
    torch.manual_seed(0)
    attention = DeformableAttention(12, heads=4, levels=3, points=2)
    nn.init.normal_(attention.attention_weights.weight)
    shapes = [(4, 4), (2, 2), (1, 1)]
    locations, weights = attention.sampling(torch.randn(2, 21, 12), reference_points(shapes, "cpu"), shapes)
    assert locations.shape == (2, 21, 4, 3, 2, 2) and weights.shape == (2, 21, 4, 3, 2)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 21, 4))
    bias = DeformableAttention(12, heads=4, levels=3, points=2).sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, :, 1], 2 * bias[:, :, 0])  # point k at distance k + 1


def test_alpha_gets_a_gradient():
    model = tiny().train()
    conv_logits, trans_logits, _ = model(torch.randn(2, 3, 64, 64))
    (conv_logits.square().sum() + trans_logits.square().sum()).backward()
    mfuc = model.conv_trans_2.mfuc
    assert mfuc.alpha_x.grad is not None and mfuc.alpha_x.grad.abs().sum() > 0
    assert mfuc.alpha_c.grad is not None and mfuc.alpha_c.grad.abs().sum() > 0


# CSConv


def csconv_and_pyramid() -> tuple[CSConv, torch.Tensor, list[tuple[int, int]]]:
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    return CSConv(16).eval(), torch.randn(2, 84, 16), shapes


@torch.no_grad()
def test_csconv_keeps_the_levels_apart():
    block, tokens, shapes = csconv_and_pyramid()
    perturbed = tokens.clone()
    perturbed[:, 80] += 10  # a token of the stride-32 level (tokens 80..83)
    before, after = block(tokens, shapes), block(perturbed, shapes)
    assert before.shape == tokens.shape
    assert torch.equal(before[:, :80], after[:, :80])
    assert not torch.equal(before[:, 80:], after[:, 80:])


@torch.no_grad()
def test_csconv_receptive_fields_are_3x3_and_5x5_per_group():
    block = csconv_and_pyramid()[0]
    hidden = torch.randn(1, 8, 9, 9)
    perturbed = hidden.clone()
    perturbed[..., 4, 4] += 10
    changed = (block.level_mix(perturbed, 0) != block.level_mix(hidden, 0)).any(0)  # [8, 9, 9]
    rows, columns = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    chebyshev = torch.maximum((rows - 4).abs(), (columns - 4).abs())
    assert torch.equal(changed[:4].any(0), chebyshev <= 1)  # group 1: 3x3
    assert torch.equal(changed[4:].any(0), chebyshev <= 2)  # group 2: 5x5


@torch.no_grad()
def test_csconv_with_a_zero_fc2_is_the_identity():
    block, tokens, shapes = csconv_and_pyramid()
    nn.init.zeros_(block.fc2.weight)
    nn.init.zeros_(block.fc2.bias)
    assert torch.equal(block(tokens, shapes), tokens)


# the builder, groups and weights


def test_builder_rows():
    standard = build_conformer_ms("conformer_cpu", VOC_CLASSES, csconv=False, etrans=None, mfuc=False,
                                  csconv_residual=False)
    assert type(standard) is Conformer and standard.cam_stride == 16 and standard.conv_cls_head.kernel_size == (3, 3)
    assert build_conformer_ms("conformer_cpu", VOC_CLASSES, csconv=False, etrans=None, mfuc=False,
                              cam_stride=32).cam_stride == 32  # Conformer's stride-2 last fusion
    etrans_only = build_conformer_ms("conformer_cpu", VOC_CLASSES, csconv=False, etrans=ETRANS_PRESETS["default"],
                                     mfuc=False)
    assert isinstance(etrans_only.trans_1.attn, EfficientAttention)
    full = build_conformer_ms("conformer_cpu", VOC_CLASSES, csconv=True, etrans=ETRANS_PRESETS["default"], mfuc=True,
                              drop_path=0.1)
    assert type(full) is ConformerMS and full.cam_stride == 32 and full.patch_size == 16
    assert full.conv_trans_12.trans_block.drop_path1.drop_prob == pytest.approx(0.1)
    assert parameter_count(full) == 8_640_418
    with pytest.raises(TypeError, match="unknown module options"):
        build_conformer_ms("conformer_cpu", VOC_CLASSES, csconv=True, etrans=None, mfuc=True, csconv_kernel=3)


def test_parameter_groups_cover_every_parameter_once():
    model = tiny()
    groups = {group.name: group for group in model.parameter_groups(10.0)}
    ids = [id(p) for group in groups.values() for p in group.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay = {id(p) for p in groups["backbone_no_decay"].params}
    for parameter in (model.cls_token, model.pyramid.level_embed, model.conv_trans_2.mfuc.alpha_x):
        assert id(parameter) in no_decay
    assert groups["new"].params == [model.trans_cls_head.weight, model.conv_cls_head.weight]
    assert groups["new_bias"].lr_mult == 10.0 and not groups["new_bias"].weight_decay
    assert model.mean == pytest.approx((0.485, 0.456, 0.406)) and model.std == pytest.approx((0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A random Conformer-S (1000 classes) state dict saved as the official release wraps it."""
    torch.manual_seed(0)
    state = conformer_s(1000).state_dict()
    path = tmp_path_factory.mktemp("weights") / "Conformer_small_patch16.pth"
    torch.save({"model": state}, path)
    return path, state


def test_an_official_checkpoint_fills_the_transformer_branch_of_conformer_ms(official_file):
    path, state = official_file
    model = build_conformer_ms("conformer_small_patch16", VOC_CLASSES, csconv=True, etrans=ETRANS_PRESETS["default"],
                               mfuc=True)
    assert parameter_count(model) == 29_838_226  # the spec's estimate: about 29.9 M
    skipped = load_conformer_weights(model, path)
    transformer = {k for k in state if k.startswith(TRANSFORMER_PREFIXES) or ".trans_block." in k}
    assert skipped == sorted(set(state) - transformer)  # the CNN branch and the 1000-class heads
    assert any(k.startswith("conv_trans_12.fusion_block.") for k in skipped)
    qkv = "conv_trans_7.trans_block.attn.qkv.weight"
    assert torch.equal(model.state_dict()[qkv], state[qkv])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])
    narrow = build_conformer_ms("conformer_small_patch16", VOC_CLASSES, csconv=True,
                                etrans=ETRANS_PRESETS["paper_budget"], mfuc=True)
    narrowed = {k for k in transformer if ".attn." in k and not k.endswith("attn.proj.bias")}  # proj.bias: [D]
    assert load_conformer_weights(narrow, path) == sorted(set(state) - transformer | narrowed)


def test_a_file_that_is_no_conformer_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cpu.pth"
    torch.save(conformer_cpu(1000).state_dict(), path)  # D = 192: no transformer key fits D = 384
    model = build_conformer_ms("conformer_small_patch16", VOC_CLASSES, csconv=True, etrans=None, mfuc=False)
    with pytest.raises(ParamsError, match="cls.pretrained") as error:
        load_conformer_weights(model, path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_paper_budget_etrans_reduces_params_and_macs_within_the_specs_bounds():
    images = torch.randn(1, 3, 224, 224)
    models = {name: conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES, attention=attention).eval()
              for name, attention in [("standard", None), *ETRANS_PRESETS.items()]}
    params = {name: parameter_count(model) for name, model in models.items()}
    macs = {name: count_macs(model, images) for name, model in models.items()}
    assert 0.12 <= 1 - params["paper_budget"] / params["standard"] <= 0.20
    assert 0.10 <= 1 - macs["paper_budget"] / macs["standard"] <= 0.16
    assert params["default"] == params["standard"] == 36_465_066 and macs["default"] < macs["standard"]
    assert count_macs(models["standard"], images, layers=False) == 12 * 2 * 197 ** 2 * 384


def test_the_cpu_presets_alpha_init_reaches_every_coupling():
    """`-S method=conformer_ms` at the cpu profile starts each MFUC's alphas at mfuc.alpha_init 0.1 (the paper
    profile at 0), through the method's builder."""
    import yaml

    from stages.compose import compose
    from wsss_core.config import parse_params
    from wsss_core.methods import get_method, method_params

    for profile, expected in (("cpu", 0.1), ("paper", 0.0)):
        params = parse_params(yaml.safe_load(compose(["method=conformer_ms", f"profile={profile}"])), method_params())
        assert params.methods["conformer_ms"].model.mfuc.alpha_init == expected
    params = parse_params(yaml.safe_load(compose(["method=conformer_ms"])), method_params())
    model = get_method(params).build_classifier(params.cls, 3, pretrained=False)
    couplings = [module for module in model.modules() if module.__class__.__name__ == "MFUC"]
    assert len(couplings) == 11  # one before each of blocks 2..12
    for coupling in couplings:
        assert torch.equal(coupling.alpha_x, torch.full_like(coupling.alpha_x, 0.1))
        assert torch.equal(coupling.alpha_c, torch.full_like(coupling.alpha_c, 0.1))
