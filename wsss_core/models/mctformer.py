"""MCTformer-V2 (Xu et al., CVPR 2022) on a timm DeiT: one class token per foreground class and a conv
CAM head on the patch tokens, as the semantic-modulation paper trains it (../shared/methods/semantic_modulation.md).

The network keeps timm's ViT modules and their state-dict names (`patch_embed`, `blocks`, `norm`,
`cls_token`, `pos_embed`), so an ImageNet DeiT state dict in timm's layout loads through
`load_deit_weights`: `cls_token` [1, 1, D] and the class slot of `pos_embed` are copied to the C
class tokens (MCTformer's initialisation), the patch positions are resized bicubically if the grid
differs, timm's 1000-class `head.*` is dropped, and `cam_head.*` (the conv CAM head) is the only new key.
Attention is read with forward hooks on timm's unchanged blocks (`models/hooks.py`).

Hybrid tokens (the cpu profile's deviation, as the ViT paper's hybrid): with a `token_backbone` (a CNN, e.g.
the packaged ImageNet Lite0 at stride 16) the patch tokens are its feature map projected 1x1 to the width
(`token_proj`), in place of the 16x16 patch convolution (`patch_embed.proj` is then removed). Tokens that
start semantic give attention a chance to behave like an affinity when the transformer trains from scratch
on a few hundred images, which the methods' refinements assume. Without one the network is MCTformer-V2's.
"""
from __future__ import annotations

from pathlib import Path

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import VIT_BACKBONES
from wsss_core.models.hooks import AttentionRecorder, feature_affinity
from wsss_core.models.pretrained import read_state_dict
from wsss_core.models.groups import ParamGroup

NEW_KEYS = ("cam_head.weight", "cam_head.bias")  # not in a timm DeiT state dict
DROPPED_PREFIXES = ("head.", "head_dist.")  # timm's ImageNet classifier


class MCTformerV2(nn.Module):
    """forward(images [B, 3, H, W]) -> (token scores [B, C], patch scores [B, C], CAM logits [B, C, h, w]).

    h = H // 16 and w = W // 16 (the patch conv drops remainder rows); the C class tokens come before the
    N = h * w patch tokens. Token scores are the class tokens' channel means (spec eq. 7), patch scores
    the spatial means of the CAM logits (eq. 9). final_norm False (MCTformer's code): the heads read the
    last block's tokens without timm's final LayerNorm, which is kept (unused) for the key layout.
    """

    def __init__(self, vit: nn.Module, num_classes: int, *, head_kernel: int = 3, final_norm: bool = False,
                 token_backbone: nn.Module | None = None, token_backbone_lr_mult: float = 0.1,
                 patch_pooling_decay: float = 1.0):
        """token_backbone: a module mapping images [B, 3, H, W] to features [B, channels, H/s, W/s] with the
        attributes `channels`, `output_stride`, `mean` and `std` (a models.backbones.Backbone); its parameters
        train at lr x token_backbone_lr_mult, and 0 freezes it (batch-norm statistics included).
        patch_pooling_decay: the patch scores' pooling of the CAM logits (ranked_pooling); 1 is GAP."""
        super().__init__()
        dim = vit.embed_dim
        self.num_classes, self.final_norm, self.patch_pooling_decay = num_classes, final_norm, patch_pooling_decay
        self.patch_embed, self.pos_drop, self.norm_pre = vit.patch_embed, vit.pos_drop, vit.norm_pre
        self.blocks, self.norm = vit.blocks, vit.norm
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)  # the positional embedding's own grid
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, dim))
        patch_positions = vit.pos_embed.detach()[:, vit.num_prefix_tokens:]  # [1, N0, D]
        self.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, num_classes, dim), patch_positions], 1))
        nn.init.trunc_normal_(self.cls_token, std=0.02)  # MCTformer's initialisation of the class tokens
        nn.init.trunc_normal_(self.pos_embed[:, :num_classes], std=0.02)
        self.cam_head = nn.Conv2d(dim, num_classes, head_kernel, padding=head_kernel // 2)
        config = getattr(vit, "pretrained_cfg", {})  # a ViT built without timm's factory has none: ImageNet's
        self.mean: tuple[float, float, float] = tuple(config.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std: tuple[float, float, float] = tuple(config.get("std", IMAGENET_DEFAULT_STD))
        self.cam_stride: int = vit.patch_embed.patch_size[0]
        self.token_backbone, self.token_backbone_lr_mult = token_backbone, token_backbone_lr_mult
        if token_backbone is not None:
            self.patch_embed.proj = None  # the tokens come from the backbone
            self.token_proj = nn.Conv2d(token_backbone.channels, dim, 1)
            self.mean, self.std, self.cam_stride = token_backbone.mean, token_backbone.std, token_backbone.output_stride
            if token_backbone_lr_mult == 0:
                token_backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "MCTformerV2":
        """Set the training mode; a frozen token backbone stays in eval mode (its batch-norm statistics fixed)."""
        super().train(mode)
        if self.token_backbone is not None and self.token_backbone_lr_mult == 0:
            self.token_backbone.eval()
        return self

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Return the patch tokens before the positions, as a map [B, D, h, w]: the 16x16 patch convolution, or
        the token backbone's features projected 1x1 (hybrid)."""
        if self.token_backbone is None:
            return self.patch_embed.proj(images)
        return self.token_proj(self.token_backbone(images))

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Return the positional embedding [1, C + height * width, D]: the patch part resized bicubically from
        the model's own grid when the grid differs, as MCTformer's code (and DINO's) does it: by the scale
        factors (height + 0.1) / grid_h and (width + 0.1) / grid_w, which also set the sampling positions."""
        classes, patches = self.pos_embed[:, :self.num_classes], self.pos_embed[:, self.num_classes:]
        if (height, width) != self.grid:
            patches = patches.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
            factors = ((height + 0.1) / self.grid[0], (width + 0.1) / self.grid[1])
            patches = F.interpolate(patches, scale_factor=factors, mode="bicubic", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2)
        return torch.cat([classes, patches], 1)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (class tokens [B, C, D], patch tokens as a map [B, D, h, w]) after the last block."""
        patches = self.patch_features(images)  # [B, D, h, w]
        batch, dim, height, width = patches.shape
        patches = self.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), patches], 1) + self.position_embedding(height, width)
        tokens = self.blocks(self.norm_pre(self.pos_drop(tokens)))
        if self.final_norm:
            tokens = self.norm(tokens)
        patch_map = tokens[:, self.num_classes:].transpose(1, 2).reshape(batch, dim, height, width)
        return tokens[:, :self.num_classes], patch_map

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        class_tokens, patch_map = self.tokens(images)
        cam_logits = self.cam_head(patch_map)
        return class_tokens.mean(-1), ranked_pooling(cam_logits, self.patch_pooling_decay), cam_logits

    @torch.no_grad()
    def token_affinity(self, images: torch.Tensor, temperature: float) -> torch.Tensor:
        """Return the hybrid tokens' feature affinity [B, N, N], float32: row i is softmax_j(cos(f_i, f_j) /
        temperature) over the token backbone's features f (before the projection, on the token grid), the
        semantic affinity that an ImageNet-pretrained ViT's attention approximates. Needs a token backbone."""
        if self.token_backbone is None:
            raise ParamsError("the token affinity needs hybrid tokens (methods.<method>.model.token_backbone)")
        return feature_affinity(self.token_backbone(images), temperature)

    @torch.no_grad()
    def cam_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CAM logits [B, C, h, w], head-averaged attention of every block [L, B, T, T], float32)."""
        with AttentionRecorder(block.attn for block in self.blocks) as recorder:
            cam_logits = self(images)[2]
        return cam_logits, torch.stack(recorder.maps)

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the ViT's weights (decayed) and its biases, norms, class tokens and positions (not decayed, as
        timm's optimizer factory for DeiT), then the CAM head at lr x new_layer_lr_mult (its bias not decayed).
        Hybrid: the 1x1 token projection is part of the ViT; the token backbone's weights and its biases and
        norms follow at lr x token_backbone_lr_mult (none when it is frozen)."""
        vit = [p for name, p in self.named_parameters() if not name.startswith(("cam_head.", "token_backbone."))]
        undecayed = {id(self.cls_token), id(self.pos_embed)}
        groups = [ParamGroup("backbone", [p for p in vit if p.ndim > 1 and id(p) not in undecayed]),
                  ParamGroup("backbone_no_decay", [p for p in vit if p.ndim <= 1 or id(p) in undecayed],
                             weight_decay=False),
                  ParamGroup("new", [self.cam_head.weight], new_layer_lr_mult),
                  ParamGroup("new_bias", [self.cam_head.bias], new_layer_lr_mult, weight_decay=False)]
        if self.token_backbone is not None and self.token_backbone_lr_mult > 0:
            cnn = list(self.token_backbone.parameters())
            groups += [ParamGroup("token_backbone", [p for p in cnn if p.ndim > 1], self.token_backbone_lr_mult),
                       ParamGroup("token_backbone_no_decay", [p for p in cnn if p.ndim <= 1],
                                  self.token_backbone_lr_mult, weight_decay=False)]
        return groups


def ranked_pooling(maps: torch.Tensor, decay: float) -> torch.Tensor:
    """Return global weighted ranking pooling [B, C] of maps [B, C, h, w]: each class's values sorted from the
    largest, the j-th weighted by decay**j, the weighted sum over the sum of the weights. decay 1 is the mean
    (GAP, MCTformer-V2), 0 the max; MCTformer+ pools its patch CAM with 0.996."""
    if decay == 1:
        return maps.mean((2, 3))
    ranked = maps.flatten(2).sort(-1, descending=True).values  # [B, C, N]
    weights = torch.full((ranked.shape[-1],), float(decay), dtype=ranked.dtype, device=ranked.device)
    weights = weights ** torch.arange(ranked.shape[-1], device=ranked.device)
    return (ranked * weights).sum(-1) / weights.sum()


def build_mctformer(name: str, num_classes: int, *, pretrained: str = "", head_kernel: int = 3,
                    final_norm: bool = False, drop_path: float = 0.1, depth: int = 0, patch_size: int = 0,
                    token_backbone: nn.Module | None = None, token_backbone_lr_mult: float = 0.1,
                    patch_pooling_decay: float = 1.0) -> MCTformerV2:
    """Return MCTformer-V2 on timm's `name` (a DeiT of VIT_BACKBONES), random or from a local DeiT state dict;
    depth and patch_size other than 0 replace the named model's (a smaller network for a CPU); a token_backbone
    makes the hybrid (module docstring; pretrained is then refused: a DeiT's patch convolution has no place)."""
    if name not in VIT_BACKBONES:
        raise ParamsError(f"cls.backbone {name!r} is not a ViT of: {', '.join(VIT_BACKBONES)}")
    if pretrained and token_backbone is not None:
        raise ParamsError(f"cls.pretrained {pretrained!r}: DeiT weights do not fit hybrid tokens (token_backbone)")
    sizes = {key: value for key, value in (("depth", depth), ("patch_size", patch_size)) if value}
    vit = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **sizes)
    model = MCTformerV2(vit, num_classes, head_kernel=head_kernel, final_norm=final_norm,
                        token_backbone=token_backbone, token_backbone_lr_mult=token_backbone_lr_mult,
                        patch_pooling_decay=patch_pooling_decay)
    if pretrained:
        load_deit_weights(model, pretrained)
    return model


def load_deit_weights(model: MCTformerV2, path: str | Path, key: str = "cls.pretrained") -> None:
    """Load an ImageNet DeiT state dict in timm's layout (optionally under 'model' or 'state_dict', as the
    official release) into model: its class token to every class token, its positions resized to the model's
    grid; `head.*` is dropped and `cam_head.*` stays new. Any other difference is a one-line ParamsError."""
    state = {k: v for k, v in read_state_dict(path, key).items() if not k.startswith(DROPPED_PREFIXES)}
    own_state = model.state_dict()
    own = set(own_state) - set(NEW_KEYS)
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ParamsError(f"{key}: {path} is not a timm DeiT state dict for {len(model.blocks)} blocks: "
                          f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:3]})")
    classes, dim = model.num_classes, model.cls_token.shape[-1]
    token, positions = state["cls_token"], state["pos_embed"]
    if token.shape != (1, 1, dim) or positions.ndim != 3 or positions.shape[-1] != dim:
        raise ParamsError(f"{key}: {path}: cls_token {tuple(token.shape)} / pos_embed {tuple(positions.shape)} "
                          f"do not fit one class token of width {dim}")
    side = round((positions.shape[1] - 1) ** 0.5)
    if side * side != positions.shape[1] - 1:
        raise ParamsError(f"{key}: {path}: pos_embed has {positions.shape[1] - 1} patch positions, not a square grid")
    patch_positions = positions[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if (side, side) != model.grid:
        patch_positions = F.interpolate(patch_positions, model.grid, mode="bicubic", align_corners=False)
    state["cls_token"] = token.expand(1, classes, dim).clone()
    state["pos_embed"] = torch.cat([positions[:, :1].expand(1, classes, dim),
                                    patch_positions.flatten(2).transpose(1, 2)], 1)
    mismatched = [k for k, v in state.items() if v.shape != own_state[k].shape]
    if mismatched:
        raise ParamsError(f"{key}: {path} has tensors of the wrong shape, e.g. {mismatched[:3]}")
    model.load_state_dict(state, strict=False)
