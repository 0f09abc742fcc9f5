"""The improved Conformer of Shen & Wang (CMC 2025): a multi-scale CNN branch of CSConv blocks, efficient attention
(Etrans) in the transformer branch and MFUC coupling. Spec: ../shared/methods/conformer.md, sections 2.2-2.9 and 7;
every gap of section 7 is a constructor argument at the spec's recommended default.

`ConformerMS` keeps Conformer's stem (`conv1`, `bn1`, 3x3 max-pool: stride 4), cls token, patch projection
(`trans_patch_conv`, 4x4 stride 4: tokens at stride 16, no positions), transformer blocks (`trans_1`,
`conv_trans_{2..depth}.trans_block`; timm's `Block`, or `EtransBlock` with `etrans`), `trans_norm` and the heads
`trans_cls_head`, `conv_cls_head`, under Conformer's names, so a Conformer checkpoint of the same D fills them
(`conformer.load_conformer_weights`). The CNN branch is new: `pyramid` turns the stem into one token set of three
levels at strides 8, 16, 32 (each level's grid flattened row-major, concatenated in that order) and, per block,
`csconv_1` / `conv_trans_{i}.csconv` (one CSConv per transformer block) update it. Its last output is fused to the
CAM stride (`cam_stride` 32: the 1/8 and 1/16 levels resized to the 1/32 grid; 16: the 1/8 and 1/32 levels to the
1/16 grid; bilinear, to size; summed; `fusion_norm` BatchNorm) and `conv_cls_head` (a `cam_head_kernel` conv) gives
the CAM logits.

The switches (Table 1 of the paper has rows for all off, Etrans only and all on):
* csconv on, mfuc on: the paper's network; before blocks 2..depth (`mfuc_start`, every `mfuc_every`-th) an MFUC
  (`conv_trans_{i}.mfuc`) couples the branches: O = FFN(MSDeformAttn(LN(F'))) over the pyramid with the patch
  tokens added to the 1/16 level (F'), then tokens += alpha_x * O aligned to 1/16 and pyramid += alpha_c * O
  (eqs. 8-10; alpha_x, alpha_c per channel, 0 at initialisation by default, so a new network equals its uncoupled
  branches).
* csconv on, mfuc off: the branches are coupled as Conformer's FCUs would be: FCU-down (`squeeze_block`: 1x1 conv
  of the 1/16 level, LayerNorm, GELU) is added to the patch tokens before the transformer block (the cls token
  enters twice, as in Conformer), FCU-up (`expand_block`: 1x1 conv of the new patch tokens, BN, ReLU) is added
  to the 1/16 level; then the CSConv block runs.
* csconv off, mfuc on: the CSConv blocks are the identity; only the MFUCs update the pyramid.
* csconv off, mfuc off: not this network; `build_conformer_ms` returns the plain `Conformer` with TransCAM's
  switches (Etrans if `etrans` is given).
`etrans` None: standard attention; a dict: `EfficientAttention` kwargs for every block (`ETRANS_PRESETS`).

Deviations from the paper, which leaves them open (spec section 7): the pyramid generator, CSConv internals, MFUC
configuration and the fusion to stride 32 follow the spec's [R] recommendations (after ViT-CoMer's MRFP and CTI);
CSConv has an identity skip (`csconv_residual`, not in eq. 1); no ImageNet pre-training of the new modules.
Inputs: H and W must be multiples of 16 (the token stride): the 1/8 and 1/16 levels are then exact and on the
token grid, the 1/32 level rounds up (ceil) and every resize between levels is "to size".
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.layers.attention import Attention
from torch import nn

from wsss_core.models.catalog import CONFORMER_SIZES
from wsss_core.models.conformer import (
    STEM_CHANNELS, BatchNorm, CouplingDown, CouplingUp, EfficientAttention, LayerNorm,
    _init_weights, build_conformer, cam_and_attention, conformer_parameter_groups, run_block, transformer_block,
)
from wsss_core.models.groups import ParamGroup

LEVELS = 3  # pyramid strides 8, 16, 32
TOKEN_LEVEL = 1  # the stride-16 level, on the transformer's token grid


def split_levels(tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """tokens [B, sum h_l * w_l, C] -> one map [B, C, h_l, w_l] per level (row-major flattening undone)."""
    parts = tokens.split([h * w for h, w in shapes], 1)
    return [part.transpose(1, 2).unflatten(2, shape) for part, shape in zip(parts, shapes)]


def merge_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Maps [B, C, h_l, w_l] -> tokens [B, sum h_l * w_l, C] (the inverse of `split_levels`)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def add_to_level(tokens: torch.Tensor, shapes: list[tuple[int, int]], level: int, feature: torch.Tensor
                 ) -> torch.Tensor:
    """Return pyramid tokens [B, N_c, C] with feature [B, C, h_level, w_level] added to that level's tokens."""
    start = sum(h * w for h, w in shapes[:level])
    end = start + shapes[level][0] * shapes[level][1]
    added = tokens[:, start:end] + feature.flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :start], added, tokens[:, end:]], 1)


def fuse_levels(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Return the sum [B, C, *size] of the maps, each bilinearly resized to size (align_corners=False)."""
    return sum(m if tuple(m.shape[-2:]) == tuple(size) else
               F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)


class PyramidGenerator(nn.Module):
    """Stem output [B, 64, H/4, W/4] -> (pyramid tokens [B, N_8 + N_16 + N_32, D], level shapes [(h_l, w_l)] * 3).

    Three 3x3 stride-2 convs (BN, ReLU) give the 1/8, 1/16, 1/32 maps, a 1x1 conv per level maps each to D, and a
    learnable level embedding (one D-vector per level) is added (spec 2.4 [R], ViT-CoMer's spatial prior module).
    """

    def __init__(self, dim: int, channels: tuple[int, int, int] = (128, 256, 256)):
        super().__init__()
        widths = (STEM_CHANNELS, *channels)
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), BatchNorm(b),
                                                 nn.ReLU(inplace=True)) for a, b in zip(widths, widths[1:]))
        self.projections = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.level_embed = nn.Parameter(torch.zeros(LEVELS, dim))

    def forward(self, stem: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        maps, x = [], stem
        for conv, projection, embedding in zip(self.convs, self.projections, self.level_embed):
            x = conv(x)
            maps.append(projection(x) + embedding[:, None, None])  # [B, D, h_l, w_l]
        return merge_levels(maps), [tuple(m.shape[-2:]) for m in maps]


class CSConv(nn.Module):
    """Cross-scale feature integration block (eq. 1, spec 2.4): pyramid tokens [B, N_c, D] -> [B, N_c, D].

    FC1 (D -> hidden), then on each level's own grid: the hidden channels cut into len(kernels) equal groups, group
    g convolved depthwise with kernel kernels[g] (padding k // 2, bias), concatenated, BatchNorm (one per level),
    GELU; FC2 (hidden -> D); plus the input when `residual` (not in eq. 1; spec [R]). Levels never mix.
    """

    def __init__(self, dim: int, *, kernels: tuple[int, ...] = (3, 5), hidden_ratio: float = 0.5,
                 residual: bool = True):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        if hidden % len(kernels):
            raise ValueError(f"CSConv: {hidden} hidden channels do not split into {len(kernels)} groups")
        self.group = hidden // len(kernels)
        self.fc1 = nn.Linear(dim, hidden)
        self.convs = nn.ModuleList(nn.Conv2d(self.group, self.group, k, padding=k // 2, groups=self.group)
                                   for k in kernels)
        self.norms = nn.ModuleList(BatchNorm(hidden) for _ in range(LEVELS))
        self.fc2 = nn.Linear(hidden, dim)
        self.residual = residual

    def level_mix(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """hidden [B, hidden, h, w] of one level -> [B, hidden, h, w]: grouped depthwise convs, BN, GELU."""
        groups = hidden.split(self.group, 1)
        return F.gelu(self.norms[level](torch.cat([conv(g) for conv, g in zip(self.convs, groups)], 1)))

    def forward(self, tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        maps = split_levels(self.fc1(tokens), shapes)
        mixed = self.fc2(merge_levels([self.level_mix(m, level) for level, m in enumerate(maps)]))
        return tokens + mixed if self.residual else mixed


def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Return each pyramid token's pixel centre (x, y), normalised to [0, 1] on its own level [N_c, 2]."""
    points = []
    for height, width in shapes:
        y, x = torch.meshgrid((torch.arange(height, device=device) + 0.5) / height,
                              (torch.arange(width, device=device) + 0.5) / width, indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) in pure PyTorch (`grid_sample`; runs on CPU).

    Each query has a reference point; per head, level and point it predicts an offset (in pixels of that level)
    and a weight, softmaxed over levels x points; the output is the weighted sum of the bilinearly sampled
    (align_corners=False, zeros outside) value maps, then `output_proj`. Initialised as Deformable DETR: zero
    offset weights with a directional bias (head h points at angle 2 pi h / heads, point k at distance k + 1),
    zero attention-weight logits (uniform weights), Xavier value and output projections.
    """

    def __init__(self, dim: int, *, heads: int = 6, levels: int = LEVELS, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"deformable attention: {dim} channels do not split into {heads} heads")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation (see the class docstring)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads) * (2 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the unit square [heads, 2]
        distances = torch.arange(1, self.points + 1, dtype=torch.float32)[:, None]  # [points, 1]
        bias = directions[:, None, None] * distances  # [heads, 1, points, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def sampling(self, query: torch.Tensor, reference: torch.Tensor, shapes: list[tuple[int, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (sampling locations (x, y) in [0, 1] [B, L_q, heads, levels, points, 2], weights
        [B, L_q, heads, levels, points], summing to 1 over levels x points) for queries [B, L_q, D] with
        reference points [L_q, 2]."""
        batch, count, _ = query.shape
        offsets = self.sampling_offsets(query).view(batch, count, self.heads, self.levels, self.points, 2)
        sizes = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)  # [levels, 2]
        locations = reference[None, :, None, None, None] + offsets / sizes[:, None]
        logits = self.attention_weights(query).view(batch, count, self.heads, self.levels * self.points)
        return locations, logits.softmax(-1).view(batch, count, self.heads, self.levels, self.points)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [B, L_q, D], reference [L_q, 2], value tokens [B, sum h_l * w_l, D] -> [B, L_q, D]."""
        batch, count, dim = query.shape
        locations, weights = self.sampling(query, reference, shapes)
        values = split_levels(self.value_proj(value).view(batch, -1, self.heads, dim // self.heads)
                              .transpose(1, 2).flatten(0, 1), shapes)  # per level [B * heads, D / heads, h, w]
        grids = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # [B * heads, L_q, levels, points, 2]
        weights = weights.transpose(1, 2).flatten(0, 1)  # [B * heads, L_q, levels, points]
        mixed = 0
        for level, level_values in enumerate(values):  # level by level: no stacked copy of the samples
            sampled = F.grid_sample(level_values, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                    align_corners=False)  # [B * heads, D / heads, L_q, points]
            mixed = mixed + (sampled * weights[:, None, :, level]).sum(-1)
        return self.output_proj(mixed.view(batch, dim, count).transpose(1, 2))


class ConvFFN(nn.Module):
    """ViT-CoMer's ConvFFN on pyramid tokens [B, N_c, D] -> [B, N_c, D]: FC D -> hidden, depthwise 3x3 on each
    level's grid, GELU, FC hidden -> D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        maps = split_levels(self.fc1(tokens), shapes)
        return self.fc2(F.gelu(merge_levels([self.dwconv(m) for m in maps])))


class MFUC(nn.Module):
    """Multi-feature coupling (eqs. 8-10, spec 2.6): (tokens [B, 1 + N, D], pyramid [B, N_c, D]) -> both updated.

    F' = the pyramid with the patch tokens added to its 1/16 level; A = MSDeformAttn(LN(F')) with every token a
    query at its own pixel centre and LN(F') the values; O = A + ConvFFN(LN(A)); patch tokens += alpha_x * (O_8 and
    O_32 resized to 1/16, + O_16) (eq. 9); pyramid += alpha_c * O (eq. 10). alpha_x, alpha_c: per channel, at
    alpha_init (0: a new network equals its uncoupled branches); separate_alpha False: one alpha for both
    equations (the paper writes a single alpha). The cls token is left alone.
    """

    def __init__(self, dim: int, *, heads: int = 6, points: int = 4, ffn_ratio: float = 0.25, alpha_init: float = 0.0,
                 separate_alpha: bool = True):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.attn = DeformableAttention(dim, heads=heads, points=points)
        self.ffn_norm = LayerNorm(dim)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))
        self.alpha_x = nn.Parameter(torch.full((dim,), alpha_init))
        self.alpha_c = nn.Parameter(torch.full((dim,), alpha_init)) if separate_alpha else self.alpha_x

    def coupling(self, patches: torch.Tensor, pyramid: torch.Tensor, shapes: list[tuple[int, int]]
                 ) -> torch.Tensor:
        """Return O [B, N_c, D] for patch tokens [B, N, D] and pyramid tokens [B, N_c, D] (eq. 8)."""
        grid = patches.transpose(1, 2).unflatten(2, shapes[TOKEN_LEVEL])  # [B, D, h, w]
        query = self.norm(add_to_level(pyramid, shapes, TOKEN_LEVEL, grid))
        attended = self.attn(query, reference_points(shapes, query.device), query, shapes)
        return attended + self.ffn(self.ffn_norm(attended), shapes)

    def forward(self, tokens: torch.Tensor, pyramid: torch.Tensor, shapes: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        coupled = self.coupling(tokens[:, 1:], pyramid, shapes)
        aligned = fuse_levels(split_levels(coupled, shapes), shapes[TOKEN_LEVEL]).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens[:, :1], tokens[:, 1:] + self.alpha_x * aligned], 1)
        return tokens, pyramid + self.alpha_c * coupled


class MSBlock(nn.Module):
    """Block i >= 2 of `ConformerMS`: (tokens [B, 1 + N, D], pyramid [B, N_c, D]) -> both updated.

    `coupling` "mfuc": MFUC, then the transformer block; "fcu": Conformer-style FCU-down before and FCU-up after
    the transformer block (see the module docstring); None: the transformer block alone. Then the CSConv block,
    if any.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 attention: dict | None, csconv: dict | None, coupling: str | None, mfuc: dict):
        super().__init__()
        self.trans_block = transformer_block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                                             attention=attention)
        self.csconv = None if csconv is None else CSConv(dim, **csconv)
        self.mfuc = MFUC(dim, **mfuc) if coupling == "mfuc" else None
        if coupling == "fcu":
            self.squeeze_block = CouplingDown(dim, dim, 1)
            self.expand_block = CouplingUp(dim, dim, 1)
        self.fcu = coupling == "fcu"

    def forward(self, tokens: torch.Tensor, pyramid: torch.Tensor, shapes: list[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = shapes[TOKEN_LEVEL]
        if self.mfuc is not None:
            tokens, pyramid = self.mfuc(tokens, pyramid, shapes)
        if self.fcu:
            level = split_levels(pyramid, shapes)[TOKEN_LEVEL]
            tokens = run_block(self.trans_block, self.squeeze_block(level, tokens) + tokens, grid)
            pyramid = add_to_level(pyramid, shapes, TOKEN_LEVEL, self.expand_block(tokens, *grid))
        else:
            tokens = run_block(self.trans_block, tokens, grid)
        return tokens, pyramid if self.csconv is None else self.csconv(pyramid, shapes)


class ConformerMS(nn.Module):
    """forward(images [B, 3, H, W]) -> (conv logits [B, C], transformer logits [B, C], CAM logits [B, C, h, w]).

    (h, w) = (H, W) / cam_stride; the conv logits are the spatial mean of the CAM logits, the transformer logits
    `trans_cls_head` on the final-LayerNorm'd cls token. H and W must be multiples of 16. Switches and options:
    see the module docstring; csconv_* configure `CSConv`, mfuc_* `MFUC` (an MFUC before blocks mfuc_start,
    mfuc_start + mfuc_every, ...; 2 and 1: before every block from the second), pyramid_channels the
    `PyramidGenerator`. Options of a switched-off module are unused.
    """

    def __init__(self, *, num_classes: int, embed_dim: int = 384, num_heads: int = 6, depth: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0, csconv: bool = True,
                 etrans: dict | None = None, mfuc: bool = True, cam_stride: int = 32, cam_head_kernel: int = 3,
                 csconv_kernels: tuple[int, ...] = (3, 5), csconv_hidden_ratio: float = 0.5,
                 csconv_residual: bool = True, mfuc_heads: int = 6, mfuc_points: int = 4,
                 mfuc_ffn_ratio: float = 0.25, mfuc_every: int = 1, mfuc_start: int = 2,
                 mfuc_alpha_init: float = 0.0, mfuc_separate_alpha: bool = True,
                 pyramid_channels: tuple[int, int, int] = (128, 256, 256)):
        super().__init__()
        if not (csconv or mfuc):
            raise ValueError("ConformerMS needs csconv or mfuc; without both it is a Conformer (build_conformer_ms)")
        if cam_stride not in (16, 32) or mfuc_every < 1 or mfuc_start < 2:
            raise ValueError(f"cam_stride must be 16 or 32, mfuc_every >= 1 and mfuc_start >= 2, got {cam_stride}, "
                             f"{mfuc_every}, {mfuc_start}")
        self.depth, self.num_classes = depth, num_classes
        self.mean, self.std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
        self.cam_stride, self.patch_size = cam_stride, 16  # CAM stride; token stride (the patch projection's)
        self.narrow_attention = etrans is not None and etrans.get("inner_dim") not in (None, embed_dim)
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        csconv_options = dict(kernels=tuple(csconv_kernels), hidden_ratio=csconv_hidden_ratio,
                              residual=csconv_residual) if csconv else None
        mfuc_options = dict(heads=mfuc_heads, points=mfuc_points, ffn_ratio=mfuc_ffn_ratio, alpha_init=mfuc_alpha_init,
                            separate_alpha=mfuc_separate_alpha)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.trans_patch_conv = nn.Conv2d(STEM_CHANNELS, embed_dim, 4, stride=4)
        self.pyramid = PyramidGenerator(embed_dim, tuple(pyramid_channels))
        self.trans_1 = transformer_block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                         drop_path=drop_paths[0], attention=etrans)
        self.csconv_1 = None if csconv_options is None else CSConv(embed_dim, **csconv_options)
        for index in range(2, depth + 1):
            coupled = index >= mfuc_start and (index - mfuc_start) % mfuc_every == 0
            coupling = ("mfuc" if coupled else None) if mfuc else "fcu"
            self.add_module(f"conv_trans_{index}", MSBlock(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_paths[index - 1],
                attention=etrans, csconv=csconv_options, coupling=coupling, mfuc=mfuc_options))
        self.fusion_norm = BatchNorm(embed_dim)
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(embed_dim, num_classes, cam_head_kernel, padding=cam_head_kernel // 2)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        trunc_normal_(self.pyramid.level_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, DeformableAttention):
                module.reset_parameters()

    @property
    def transformer_blocks(self) -> list[nn.Module]:
        """Return the depth transformer blocks in order (`trans_1`, then each `conv_trans_i.trans_block`)."""
        return [self.trans_1] + [getattr(self, f"conv_trans_{i}").trans_block for i in range(2, self.depth + 1)]

    def pretrained_keys(self) -> list[str]:
        """Return the state-dict keys a Conformer checkpoint of the same D must fill: stem, cls token, patch
        projection, transformer blocks (without the attention projections when etrans narrows them) and
        trans_norm."""
        prefixes = ("cls_token", "conv1.", "bn1.", "trans_patch_conv.", "trans_1.", "trans_norm.")
        keys = [k for k in self.state_dict() if k.startswith(prefixes) or ".trans_block." in k]
        return [k for k in keys if not (self.narrow_attention and ".attn." in k)]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (fused CNN map [B, D, H/cam_stride, W/cam_stride], normalised tokens [B, 1 + N, D])."""
        if images.shape[-2] % 16 or images.shape[-1] % 16:
            raise ValueError(f"input size {tuple(images.shape[-2:])} is not a multiple of 16")
        stem = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, stride=2, padding=1)  # [B, 64, H/4, W/4]
        patches = self.trans_patch_conv(stem).flatten(2).transpose(1, 2)  # [B, N, D]
        pyramid, shapes = self.pyramid(stem)  # [B, N_c, D]
        tokens = run_block(self.trans_1, torch.cat([self.cls_token.expand(len(images), -1, -1), patches], 1),
                           shapes[TOKEN_LEVEL])
        if self.csconv_1 is not None:
            pyramid = self.csconv_1(pyramid, shapes)
        for index in range(2, self.depth + 1):
            tokens, pyramid = getattr(self, f"conv_trans_{index}")(tokens, pyramid, shapes)
        size = shapes[2 if self.cam_stride == 32 else TOKEN_LEVEL]
        return self.fusion_norm(fuse_levels(split_levels(pyramid, shapes), size)), self.trans_norm(tokens)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused, tokens = self.features(images)
        cam_logits = self.conv_cls_head(fused)
        return cam_logits.mean((2, 3)), self.trans_cls_head(tokens[:, 0]), cam_logits

    @torch.no_grad()
    def cam_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CAM logits on the token grid [B, C, H/16, W/16] (bilinear from stride 32), head-averaged
        attention of every transformer block [L, B, 1 + N, 1 + N], float32, compressed keys expanded back);
        MFUC's deformable attention is not included."""
        return cam_and_attention(self, images)

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the groups of `conformer_parameter_groups`; the level embedding is not decayed either."""
        return conformer_parameter_groups(self, new_layer_lr_mult, ("cls_token", "pyramid.level_embed"))


MODULE_OPTIONS = tuple(name for name in inspect.signature(ConformerMS).parameters
                       if name.startswith(("csconv_", "mfuc_", "pyramid_")))


def build_conformer_ms(size: str, num_classes: int, *, csconv: bool, etrans: dict | None, mfuc: bool,
                       cam_stride: int | None = None, cam_head_kernel: int = 3, drop_path: float | None = None,
                       **module_options) -> nn.Module:
    """Return the network of one ablation row at a `CONFORMER_SIZES` size (its D, heads; drop path unless given).

    csconv or mfuc on: a `ConformerMS` (cam_stride None = 32). Both off: the plain `Conformer` with TransCAM's
    switches (cam_stride None or 16; 32 keeps Conformer's stride-2 last fusion) and `etrans` as its attention;
    module_options (of the switched-off modules) are then unused. Unknown options are a TypeError. Every switch
    on (Etrans `default`), 21 classes: 29,838,226 parameters at conformer_small_patch16 (spec estimate 29.9 M),
    8,640,418 at conformer_cpu.
    """
    unknown = sorted(set(module_options) - set(MODULE_OPTIONS))
    if unknown:
        raise TypeError(f"build_conformer_ms: unknown module options {unknown}; known: {list(MODULE_OPTIONS)}")
    if csconv or mfuc:
        config = {k: v for k, v in CONFORMER_SIZES[size].items() if k != "channel_ratio"}
        if drop_path is not None:
            config["drop_path_rate"] = drop_path
        return ConformerMS(num_classes=num_classes, csconv=csconv, etrans=etrans, mfuc=mfuc,
                           cam_stride=cam_stride or 32, cam_head_kernel=cam_head_kernel, **config, **module_options)
    if cam_stride not in (None, 16, 32):
        raise ValueError(f"cam_stride must be 16 or 32, got {cam_stride}")
    return build_conformer(size, num_classes, cam_head_kernel=cam_head_kernel, drop_path=drop_path, attention=etrans,
                           last_fusion_stride=(cam_stride or 16) // 16)


def count_macs(model: nn.Module, images: torch.Tensor, *, layers: bool = True) -> int:
    """Return the multiply-adds of one forward pass on images: Conv2d and Linear layers (hooked; not with layers
    False) plus the q k^T and attention x v products of timm `Attention` and `EfficientAttention` modules. Norms,
    activations, pooling, resizing and grid sampling are not counted."""
    total = 0

    def layer(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * kernel
        else:
            total += output.numel() * module.in_features

    def attention(module: nn.Module, args: tuple, output) -> None:
        nonlocal total
        if isinstance(module, EfficientAttention):
            total += module.matmul_macs(len(args[0]), args[1])
        else:
            batch, count, _ = args[0].shape
            total += 2 * batch * count * count * module.num_heads * module.head_dim

    handles = [m.register_forward_hook(attention) for m in model.modules()
               if isinstance(m, (Attention, EfficientAttention))]
    if layers:
        handles += [m.register_forward_hook(layer) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return total
