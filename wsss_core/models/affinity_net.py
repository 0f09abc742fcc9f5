"""AffinityNet (PSA, Ahn & Kwak 2018) on a timm backbone, affinity features at stride 8.

Multi-level features (the last three stages) go through 1x1 convs (64, 128, 256 channels, ELU),
are concatenated and fused by a 1x1 conv (448, ELU); the affinity of two feature pixels i, j is
exp(-mean_c |f_i - f_j|).

Two layouts of the backbone: dilated (PSA's: the backbone runs at output stride 8, so its last
three stages are all at stride 8), or native (the stages at their own strides 8, 16 and 32,
bilinearly resized to stride 8 before the 1x1 convs, as IRN's edge branch combines its levels).
The native layout costs a fraction of the dilated one (no dilated convolutions at full width).
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CNN_BACKBONES
from wsss_core.models.groups import ParamGroup, backbone_and_new_groups
from wsss_core.models.pretrained import LITE0_PACKAGE_NAME, load_backbone_file, load_lite0_package_weights

LEVEL_CHANNELS = (64, 128, 256)
FEATURE_CHANNELS = 448


class AffinityNet(nn.Module):
    """forward(images [B,3,H,W]) -> affinity features [B, 448, ceil(H/8), ceil(W/8)]."""

    stride = 8
    backbone_frozen = False

    def __init__(self, backbone: str, pretrained: str = "", param_key: str = "affinity.pretrained", dilated: bool = True):
        super().__init__()
        if backbone not in CNN_BACKBONES:
            raise ParamsError(f"affinity.backbone {backbone!r} is not one of: {', '.join(CNN_BACKBONES)}")
        output_stride = {"output_stride": self.stride} if dilated else {}
        full = timm.create_model(backbone, pretrained=False, **output_stride)
        if pretrained == LITE0_PACKAGE_NAME:
            if backbone != "tf_efficientnet_lite0":
                raise ParamsError(f"{param_key}={LITE0_PACKAGE_NAME} needs backbone tf_efficientnet_lite0")
            load_lite0_package_weights(full)
        elif pretrained:
            load_backbone_file(full, pretrained, param_key)
        self.mean, self.std = tuple(full.pretrained_cfg["mean"]), tuple(full.pretrained_cfg["std"])
        levels = len(full.feature_info)
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                         out_indices=tuple(range(levels - 3, levels)), **output_stride)
        assert self.encoder.feature_info.reduction()[0] == self.stride, "the finest level must be at stride 8"
        missing = self.encoder.load_state_dict(full.state_dict(), strict=False).missing_keys
        assert not missing, f"encoder keys absent from the {backbone} model: {missing[:3]}"
        self.reducers = nn.ModuleList(
            nn.Conv2d(channels, out, 1, bias=False) for channels, out in zip(self.encoder.feature_info.channels(), LEVEL_CHANNELS)
        )
        self.fuse = nn.Conv2d(sum(LEVEL_CHANNELS), FEATURE_CHANNELS, 1, bias=False)
        for layer in self.reducers:
            nn.init.kaiming_normal_(layer.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.encoder(images)  # dilated: all at stride 8; native: strides 8, 16, 32
        size = levels[0].shape[-2:]
        reduced = [F.elu(reducer(F.interpolate(level, size, mode="bilinear", align_corners=False)
                                 if level.shape[-2:] != size else level))
                   for reducer, level in zip(self.reducers, levels)]
        return F.elu(self.fuse(torch.cat(reduced, dim=1)))

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the encoder (lr x1) and the new 1x1 layers (lr x new_layer_lr_mult), all with weight decay."""
        return backbone_and_new_groups(self.encoder, self, new_layer_lr_mult)

    def freeze_backbone(self) -> None:
        """Stop the encoder's gradients and keep it in eval mode (BN statistics fixed) from now on.

        For CPUs: the backward pass of dilated depthwise convolutions (EfficientNet at stride 8)
        is about 30x slower than the forward pass there.
        """
        self.encoder.requires_grad_(False)
        self.backbone_frozen = True
        self.encoder.eval()

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if self.backbone_frozen:
            self.encoder.eval()
        return self


def pair_affinities(features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Return exp(-mean_c |f(y,x) - f(y+dy,x+dx)|) as [B, O, h, w]; 0 where the neighbour is outside.

    features: [B, C, h, w]; offsets: from wsss_core.affinity.pairs.neighbour_offsets.
    """
    batch, _, height, width = features.shape
    out = features.new_zeros(batch, len(offsets), height, width)
    for index, (dy, dx) in enumerate(offsets):
        rows = slice(0, height - dy)
        cols = slice(max(0, -dx), width - max(0, dx))
        source = features[:, :, rows, cols]
        target = features[:, :, dy:height, max(0, dx):width - max(0, -dx)]
        out[:, index, rows, cols] = torch.exp(-(source - target).abs().mean(1))
    return out


def affinity_loss(affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Return PSA's loss bg/4 + fg/4 + neg/2 and its parts; masks and affinity are [B, O, h, w].

    Each part is a mean over its pairs: -log(a) for positives, -log(1 - a) for negatives.
    """
    eps = 1e-5
    parts = {
        "bg": -(torch.log(affinity + eps) * bg_pos).sum() / (bg_pos.sum() + eps),
        "fg": -(torch.log(affinity + eps) * fg_pos).sum() / (fg_pos.sum() + eps),
        "neg": -(torch.log(1 + eps - affinity) * neg).sum() / (neg.sum() + eps),
    }
    loss = parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2
    return loss, {name: value.item() for name, value in parts.items()}
