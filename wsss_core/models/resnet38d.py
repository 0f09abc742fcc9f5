"""ResNet-38d (Wu, Shen & van den Hengel, "Wider or deeper", 2019) in the layout of PSA / AffinityNet.

Module and parameter names are PSA's (github jiwoon-ahn/psa, network/resnet38d.py), so its converted
ImageNet weights (ilsvrc-cls_rna-a1_cls1000_ep-0001) and its trained res38_cls.pth load as they are.
Blocks are pre-activation: each starts with BN-ReLU of its input, and its output is the residual sum
before any activation. Output stride 8: b2-b4 stride 2, b5 at dilation 2, b6-b7 at dilation 4.

`stages()` cuts the network into six stages that share its modules; each returns:
    stage1  conv1a's output (no BN-ReLU)                          64 ch, stride 1
    stage2  b2_2's residual sum (pre-activation)                 128 ch, stride 2
    stage3  b3_2's residual sum (pre-activation)                 256 ch, stride 4
    stage4  b4_5's residual sum (pre-activation)                 512 ch, stride 8
    stage5  b5_2's residual sum (pre-activation)                1024 ch, stride 8
    top     ReLU(bn7(b7's residual sum)) = PSA's 'conv6'        4096 ch, stride 8
PSA's AffinityNet taps 'conv4' and 'conv5' are BN-ReLU of stage4's and stage5's outputs, computed by the
next block's bn_branch2a (b5's and b6's), i.e. inside the following stage.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.pretrained import read_state_dict

STAGE_LAYERS = (("conv1a",), ("b2", "b2_1", "b2_2"), ("b3", "b3_1", "b3_2"),
                ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"), ("b5", "b5_1", "b5_2"), ("b6", "b7", "bn7"))
"""The modules of each stage, in order (top adds a ReLU after bn7)."""
CLASSIFIER_PREFIXES = ("fc8.", "linear1000.")
"""Classifier keys skipped on load: PSA's VOC classifier (res38_cls.pth) and the ImageNet one (mxnet's
name; PSA's converter drops it, so a converted ImageNet file usually has none)."""


class ResBlock(nn.Module):
    """Pre-activation wide block: shortcut + conv3x3(BN-ReLU(conv3x3(BN-ReLU(x)))).

    The shortcut is x itself, or a 1x1 conv (with the block's stride) of BN-ReLU(x) where the shape
    changes. first_dilation is the first 3x3 conv's dilation (default: dilation; PSA's b5 uses 1, then 2).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, first_dilation: int | None = None):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.conv_branch1 = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                             if in_channels != out_channels or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(activated)
        return shortcut + self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(activated))))


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck (b6, b7): 1x1 to out/4, dilated 3x3 to out/2, 1x1 to out, each after
    BN-ReLU, with channel dropout before the last two convs; the shortcut is a 1x1 conv of BN-ReLU(x)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        quarter, half = max(1, out_channels // 4), max(1, out_channels // 2)
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, quarter, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(quarter)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(quarter, half, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(half)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(half, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(activated) + branch


class ResNet38d(nn.Module):
    """ResNet-38d: forward(images [B,3,H,W]) -> ReLU(bn7(...)) [B, 4096*width, ceil(H/8), ceil(W/8)].

    width scales every channel count (rounded, at least 1; 1.0 is the real network). Inputs are RGB in
    [0, 1] normalised with `mean` and `std` (ImageNet's, as PSA).
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"ResNet38d width must be positive, got {width}")

        def scaled(channels: int) -> int:
            return max(1, round(channels * width))

        c64, c128, c256, c512, c1024, c2048, c4096 = map(scaled, (64, 128, 256, 512, 1024, 2048, 4096))
        self.conv1a = nn.Conv2d(3, c64, 3, padding=1, bias=False)
        self.b2 = ResBlock(c64, c128, c128, stride=2)
        self.b2_1 = ResBlock(c128, c128, c128)
        self.b2_2 = ResBlock(c128, c128, c128)
        self.b3 = ResBlock(c128, c256, c256, stride=2)
        self.b3_1 = ResBlock(c256, c256, c256)
        self.b3_2 = ResBlock(c256, c256, c256)
        self.b4 = ResBlock(c256, c512, c512, stride=2)
        self.b4_1 = ResBlock(c512, c512, c512)
        self.b4_2 = ResBlock(c512, c512, c512)
        self.b4_3 = ResBlock(c512, c512, c512)
        self.b4_4 = ResBlock(c512, c512, c512)
        self.b4_5 = ResBlock(c512, c512, c512)
        self.b5 = ResBlock(c512, c512, c1024, dilation=2, first_dilation=1)
        self.b5_1 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b5_2 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b6 = ResBlockBottleneck(c1024, c2048, dilation=4, dropout=0.3)
        self.b7 = ResBlockBottleneck(c2048, c4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c4096)
        self.stage_channels: tuple[int, ...] = (c64, c128, c256, c512, c1024, c4096)

    def stages(self) -> tuple[nn.Sequential, ...]:
        """Return [stage1, stage2, stage3, stage4, stage5, top] (see the module docstring): new Sequential
        views over this network's own modules (shared, not copied). Register either the views or the
        network in a parent module, not both, or its state dict holds every tensor twice."""
        views = [nn.Sequential(*(getattr(self, name) for name in names)) for names in STAGE_LAYERS]
        views[-1].append(nn.ReLU())
        return tuple(views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = images
        for stage in self.stages():
            features = stage(features)
        return features


def load_resnet38d_weights(model: ResNet38d, path: str | Path, param_key: str) -> list[str]:
    """Load a PSA-layout ResNet-38d state dict (optionally under 'state_dict' or 'model', 'module.'-prefixed)
    into model and return the classifier keys it skipped (CLASSIFIER_PREFIXES).

    BatchNorm's num_batches_tracked may be absent (PSA's files predate it). Any other missing or unexpected
    key, or a tensor of the wrong shape, is a one-line ParamsError naming param_key, the file and the key.
    """
    state = read_state_dict(path, param_key)
    skipped = sorted(key for key in state if key.startswith(CLASSIFIER_PREFIXES))
    state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIXES)}
    own = model.state_dict()
    missing = [key for key in own if key not in state and not key.endswith(".num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        first = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ParamsError(f"{param_key}: {path} does not fit ResNet-38d: {first} ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != own[key].shape:
            found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ParamsError(f"{param_key}: {path}: {key!r} is {found} in the file, ResNet-38d needs "
                              f"{list(own[key].shape)}")
    model.load_state_dict(state)  # strict; BatchNorm fills an absent num_batches_tracked
    return skipped
