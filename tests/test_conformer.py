"""Conformer / TransCAM network (`models/conformer.py`): the spec's parameter counts (../shared/methods/conformer.md,
section 2.1), the official checkpoint layout and its loading, output shapes, input sizes, the attention read with
hooks, the efficient-attention (Etrans) blocks and the training interface."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CONFORMER_SIZES
from wsss_core.models.conformer import (
    ETRANS_PRESETS, TRANSCAM_SWITCHES, Conformer, EfficientAttention, build_conformer,
    conformer_cpu, conformer_s, load_conformer_weights,
)

torch.set_num_threads(1)

VOC_CLASSES = 21  # TransCAM: background + 20, the background channel never supervised
HEAD_KEYS = {"trans_cls_head.weight", "trans_cls_head.bias", "conv_cls_head.weight", "conv_cls_head.bias"}

# Keys of the official `Conformer_small_patch16` (pengzhiliang/Conformer, conformer.py) and their shapes,
# read from its code: ConvBlock conv1/bn1/conv2/bn2/conv3/bn3 (+ residual_conv/residual_bn), FCUDown
# conv_project/ln, FCUUp conv_project/bn, Block norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2.
OFFICIAL_S_KEYS = {
    "cls_token": (1, 1, 384),
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "conv_1.conv1.weight": (64, 64, 1, 1),
    "conv_1.residual_conv.weight": (256, 64, 1, 1),
    "trans_patch_conv.weight": (384, 64, 4, 4),
    "trans_patch_conv.bias": (384,),
    "trans_1.norm1.weight": (384,),
    "trans_1.attn.qkv.weight": (1152, 384),
    "trans_1.attn.qkv.bias": (1152,),
    "trans_1.attn.proj.weight": (384, 384),
    "trans_1.mlp.fc1.weight": (1536, 384),
    "trans_1.mlp.fc2.bias": (384,),
    "conv_trans_2.cnn_block.conv2.weight": (64, 64, 3, 3),
    "conv_trans_2.squeeze_block.conv_project.weight": (384, 64, 1, 1),
    "conv_trans_2.squeeze_block.ln.weight": (384,),
    "conv_trans_2.expand_block.conv_project.weight": (64, 384, 1, 1),
    "conv_trans_2.expand_block.bn.running_mean": (64,),
    "conv_trans_5.cnn_block.conv2.weight": (128, 128, 3, 3),
    "conv_trans_5.cnn_block.residual_conv.weight": (512, 256, 1, 1),
    "conv_trans_9.cnn_block.residual_bn.weight": (1024,),
    "conv_trans_9.squeeze_block.conv_project.weight": (384, 256, 1, 1),
    "conv_trans_12.fusion_block.conv3.weight": (1024, 256, 1, 1),
    "conv_trans_12.fusion_block.residual_conv.weight": (1024, 1024, 1, 1),
    "conv_trans_12.fusion_block.bn3.num_batches_tracked": (),
    "conv_trans_12.trans_block.norm2.bias": (384,),
    "conv_trans_12.trans_block.attn.proj.bias": (384,),
    "trans_norm.weight": (384,),
    "trans_cls_head.weight": (1000, 384),
    "conv_cls_head.weight": (1000, 1024),
    "conv_cls_head.bias": (1000,),
}
# Not in the official layout: an identity shortcut where channels and stride are kept, the projection shortcut
# only in the last block's fusion bottleneck, no `med_block` (num_med_block = 0).
ABSENT_KEYS = ("conv_trans_2.cnn_block.residual_conv.weight", "conv_trans_11.fusion_block.residual_conv.weight",
               "conv_trans_6.cnn_block.residual_bn.weight", "conv_trans_2.med_block.0.conv1.weight")
OFFICIAL_S_KEY_COUNT = 718  # len(Conformer_small_patch16().state_dict()): 463 parameters + 255 BatchNorm buffers


def parameter_count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope="module")
def conformer_s_1000() -> Conformer:
    return conformer_s(1000)


@pytest.fixture(scope="module")
def transcam_s() -> Conformer:
    return conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES)


@pytest.fixture(scope="module")
def small_transcam() -> Conformer:
    torch.manual_seed(0)
    return conformer_cpu(VOC_CLASSES, **TRANSCAM_SWITCHES).eval()


@pytest.fixture(scope="module")
def small_original() -> Conformer:
    torch.manual_seed(0)
    return conformer_cpu(VOC_CLASSES).eval()


# parameter counts (spec 2.1)


def test_conformer_s_has_the_specs_parameter_count(conformer_s_1000):
    assert parameter_count(conformer_s_1000) == 37_673_424


def test_transcam_s_and_its_attention_have_the_specs_parameter_counts(transcam_s):
    assert parameter_count(transcam_s) == 36_465_066
    assert len(transcam_s.transformer_blocks) == 12
    assert sum(parameter_count(block.attn) for block in transcam_s.transformer_blocks) == 7_096_320


def test_small_size_has_its_documented_parameter_count(small_transcam, small_original):
    assert parameter_count(small_transcam) == 6_610_362
    assert parameter_count(small_original) == 6_567_354


def test_drop_path_rises_linearly_to_0_1_over_the_transformer_blocks(conformer_s_1000):
    blocks = conformer_s_1000.transformer_blocks
    assert isinstance(blocks[0].drop_path1, nn.Identity)  # rate 0 in block 1
    rates = [block.drop_path1.drop_prob for block in blocks[1:]]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(1, 12)])


# the official checkpoint layout


def test_state_dict_follows_the_official_conformer_s_layout(conformer_s_1000):
    state = conformer_s_1000.state_dict()
    assert len(state) == OFFICIAL_S_KEY_COUNT
    assert {key: tuple(state[key].shape) for key in OFFICIAL_S_KEYS if key in state} == OFFICIAL_S_KEYS
    assert not [key for key in ABSENT_KEYS if key in state]
    assert {key.split(".")[0] for key in state} == {
        "cls_token", "conv1", "bn1", "conv_1", "trans_patch_conv", "trans_1", "trans_norm", "trans_cls_head",
        "conv_cls_head", *(f"conv_trans_{i}" for i in range(2, 13))}


def test_an_imagenet_conformer_s_state_dict_loads_into_transcam_s_apart_from_the_heads(conformer_s_1000, transcam_s):
    state = conformer_s_1000.state_dict()
    target = conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES)
    result = target.load_state_dict({k: v for k, v in state.items() if k not in HEAD_KEYS}, strict=False)
    assert set(result.missing_keys) == HEAD_KEYS and not result.unexpected_keys
    assert torch.equal(target.conv_trans_12.fusion_block.residual_conv.weight,
                       state["conv_trans_12.fusion_block.residual_conv.weight"])
    assert tuple(transcam_s.conv_cls_head.weight.shape) == (VOC_CLASSES, 1024, 3, 3)


# outputs


@torch.no_grad()
def test_transcam_outputs_on_the_token_grid(small_transcam):
    conv_logits, trans_logits, cam_logits = small_transcam(torch.randn(1, 3, 64, 96))
    assert conv_logits.shape == trans_logits.shape == (1, VOC_CLASSES)
    assert cam_logits.shape == (1, VOC_CLASSES, 4, 6)  # the 64/16 x 96/16 token grid
    torch.testing.assert_close(conv_logits, cam_logits.mean((2, 3)))


@torch.no_grad()
def test_original_head_pools_then_applies_the_linear_head(small_original):
    images = torch.randn(1, 3, 64, 96)
    conv_logits, trans_logits, cam_logits = small_original(images)
    assert conv_logits.shape == trans_logits.shape == (1, VOC_CLASSES)
    assert cam_logits.shape == (1, VOC_CLASSES, 2, 3)  # stride 32: the last fusion halves the 4 x 6 grid
    cnn_map, tokens = small_original.features(images)
    official_conv = small_original.conv_cls_head(cnn_map.mean((2, 3)))
    torch.testing.assert_close(conv_logits, official_conv, rtol=1e-5, atol=1e-5 * official_conv.abs().max().item())
    torch.testing.assert_close(trans_logits, small_original.trans_cls_head(tokens[:, 0]))


@torch.no_grad()
@pytest.mark.parametrize("size, transcam_grid, original_grid", [
    ((80, 80), (5, 5), (3, 3)),  # a multiple of 16, not of 32: the stride-2 fusion rounds up
    ((224, 224), (14, 14), (7, 7)),
])
def test_input_sizes(small_transcam, small_original, size, transcam_grid, original_grid):
    images = torch.randn(1, 3, *size)
    assert small_transcam(images)[2].shape[-2:] == transcam_grid
    assert small_original(images)[2].shape[-2:] == original_grid


@pytest.mark.parametrize("size", [(72, 64), (64, 100)])
def test_sizes_off_the_patch_grid_are_refused(small_transcam, size):
    with pytest.raises(ValueError, match="multiple of 16"):
        small_transcam(torch.randn(1, 3, *size))


@pytest.mark.parametrize("arguments", [{"depth": 10}, {"patch_size": 8}, {"last_fusion_stride": 4}])
def test_unsupported_sizes_are_refused(arguments):
    with pytest.raises(ValueError):
        conformer_cpu(VOC_CLASSES, **arguments)


# attention


@torch.no_grad()
def test_attention_of_every_block_through_hooks(small_transcam):
    images = torch.randn(1, 3, 64, 96)
    plain_cam = small_transcam(images)[2]
    cam_logits, attention = small_transcam.cam_and_attention(images)
    tokens = 1 + 4 * 6
    assert attention.shape == (12, 1, tokens, tokens) and attention.dtype == torch.float32
    assert attention.min() >= 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(12, 1, tokens))
    assert torch.equal(cam_logits, plain_cam)  # the hooks leave the outputs alone
    assert not any(block.attn._forward_hooks for block in small_transcam.transformer_blocks)


@pytest.fixture(scope="module")
def small_etrans() -> Conformer:
    torch.manual_seed(0)
    return conformer_cpu(VOC_CLASSES, **TRANSCAM_SWITCHES, attention=ETRANS_PRESETS["default"]).eval()


@torch.no_grad()
@pytest.mark.parametrize("size", [80, 112])  # token grids 5 x 5 and 7 x 7: odd widths, keys padded
def test_efficient_attention_of_every_block_on_odd_token_grids(small_etrans, size):
    images = torch.randn(2, 3, size, size)
    cam_logits, attention = small_etrans.cam_and_attention(images)
    tokens = 1 + (size // 16) ** 2
    assert cam_logits.shape == (2, VOC_CLASSES, size // 16, size // 16)
    assert attention.shape == (12, 2, tokens, tokens) and attention.dtype == torch.float32
    assert attention.min() >= 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(12, 2, tokens))
    assert torch.equal(cam_logits, small_etrans(images)[2])
    assert all(isinstance(block.attn, EfficientAttention) for block in small_etrans.transformer_blocks)
    assert not any(block.attn._forward_hooks for block in small_etrans.transformer_blocks)


def test_etrans_at_full_width_keeps_the_official_keys_and_shapes(small_transcam, small_etrans):
    assert {k: v.shape for k, v in small_etrans.state_dict().items()} == \
        {k: v.shape for k, v in small_transcam.state_dict().items()}


def test_official_sizes_have_their_published_parameter_counts():
    assert set(CONFORMER_SIZES) == {"conformer_tiny_patch16", "conformer_small_patch16", "conformer_base_patch16",
                                    "conformer_cpu"}
    official = {size: Conformer(num_classes=1000, **CONFORMER_SIZES[size])
                for size in ("conformer_tiny_patch16", "conformer_base_patch16")}
    assert parameter_count(official["conformer_tiny_patch16"]) == 23_524_704  # published: 23.5 M
    assert parameter_count(official["conformer_base_patch16"]) == 83_289_136  # published: 83.3 M
    transcam = build_conformer("conformer_small_patch16", VOC_CLASSES, drop_path=0.2)
    assert parameter_count(transcam) == 36_465_066 and transcam.cam_stride == 16
    assert transcam.conv_trans_12.trans_block.drop_path1.drop_prob == pytest.approx(0.2)


def test_training_interface(small_transcam, small_original):
    assert (small_transcam.cam_stride, small_original.cam_stride, small_transcam.patch_size) == (16, 32, 16)
    assert small_transcam.mean == pytest.approx((0.485, 0.456, 0.406))
    assert small_transcam.std == pytest.approx((0.229, 0.224, 0.225))
    groups = {group.name: group for group in small_transcam.parameter_groups(10.0)}
    ids = [id(p) for group in groups.values() for p in group.params]
    assert len(ids) == len(set(ids)) == len(list(small_transcam.parameters()))
    assert groups["new"].params == [small_transcam.trans_cls_head.weight, small_transcam.conv_cls_head.weight]
    assert groups["new"].lr_mult == groups["new_bias"].lr_mult == 10.0 and groups["backbone"].lr_mult == 1.0
    no_decay = {id(p) for p in groups["backbone_no_decay"].params}
    assert id(small_transcam.cls_token) in no_decay and id(small_transcam.trans_1.norm1.weight) in no_decay
    assert not groups["backbone_no_decay"].weight_decay and groups["backbone"].weight_decay
    assert all(p.ndim > 1 for p in groups["backbone"].params)


@pytest.fixture(scope="module")
def official_file(conformer_s_1000, tmp_path_factory):
    """conformer_s(1000)'s state dict saved as the official release wraps it ({'model': state})."""
    path = tmp_path_factory.mktemp("weights") / "Conformer_small_patch16.pth"
    torch.save({"model": conformer_s_1000.state_dict()}, path)
    return path


@pytest.mark.parametrize("attention", [None, ETRANS_PRESETS["default"]])
def test_an_official_file_loads_into_transcam_s_apart_from_the_heads(conformer_s_1000, official_file, attention):
    model = conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES, attention=attention)
    assert load_conformer_weights(model, official_file) == sorted(HEAD_KEYS)
    assert torch.equal(model.conv_trans_12.trans_block.attn.qkv.weight,
                       conformer_s_1000.conv_trans_12.trans_block.attn.qkv.weight)
    assert torch.equal(model.conv_trans_12.fusion_block.residual_conv.weight,
                       conformer_s_1000.conv_trans_12.fusion_block.residual_conv.weight)


def test_a_file_that_does_not_fit_is_one_params_error(official_file, tmp_path):
    narrow = conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES, attention=ETRANS_PRESETS["paper_budget"])
    with pytest.raises(ParamsError, match="36 of another shape") as error:
        load_conformer_weights(narrow, official_file, key="model.pretrained")  # 12 x qkv, qkv bias, proj
    assert "\n" not in str(error.value) and "model.pretrained" in str(error.value)
    small = conformer_cpu(1000)
    with pytest.raises(ParamsError, match="cls.pretrained") as error:
        load_conformer_weights(small, official_file)
    assert "\n" not in str(error.value) and str(official_file) in str(error.value)
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2], not_weights)
    with pytest.raises(ParamsError, match="not a state dict"):
        load_conformer_weights(small, not_weights)
