"""Segmentation networks: DeepLabV3+ over a timm backbone, and torchvision's DeepLabV3 (ResNet-50/101)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss_core.models.backbones import Backbone
from wsss_core.models.pretrained import load_backbone_file
from wsss_core.models.groups import ParamGroup, backbone_and_new_groups

SEG_ARCHS = ("deeplabv3plus", "deeplabv3_resnet50", "deeplabv3_resnet101")
ASPP_CHANNELS = 256  # DeepLabV3+'s width of ASPP and decoder (the `channels` default)
LOW_LEVEL_CHANNELS = 48  # DeepLabV3+'s reduced stride-4 features
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}  # DeepLab's rates scale with 1 / output stride
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and image pooling, projected to `channels`."""

    def __init__(self, in_channels: int, rates: tuple[int, int, int], channels: int = ASPP_CHANNELS):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)]
                                      + [_conv_bn_relu(in_channels, channels, 3, rate) for rate in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=False),
                                        nn.ReLU(inplace=True))  # no BN: a 1x1 map with batch 1 must work
        self.project = nn.Sequential(_conv_bn_relu(5 * channels, channels, 1), nn.Dropout(0.1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return [B, channels, h, w] for features [B, C, h, w]."""
        pooled = self.image_pool(features).expand(-1, -1, *features.shape[-2:])
        return self.project(torch.cat([branch(features) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): ASPP on the last features, a decoder fusing stride-4 features."""

    def __init__(self, backbone: Backbone, num_classes: int, channels: int = ASPP_CHANNELS):
        super().__init__()
        self.backbone = backbone
        info = backbone.body.feature_info
        self.low_index, self.high_index = 1, len(info) - 1  # stride-4 stage, last stage
        rates = ASPP_RATES[backbone.output_stride]
        self.aspp = ASPP(info[self.high_index]["num_chs"], rates, channels)
        self.low_project = _conv_bn_relu(info[self.low_index]["num_chs"], LOW_LEVEL_CHANNELS, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(channels + LOW_LEVEL_CHANNELS, channels, 3),
                                     _conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.mean, self.std = backbone.mean, backbone.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, num_classes, H, W] at the input size."""
        low, high = self.backbone.body.forward_intermediates(
            images, indices=[self.low_index, self.high_index], intermediates_only=True)  # stride 4, stride OS
        context = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.decoder(torch.cat([context, self.low_project(low)], dim=1))  # [B, 256, H/4, W/4]
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the backbone (lr x1) and ASPP + decoder (lr x new_layer_lr_mult), all with weight decay."""
        return backbone_and_new_groups(self.backbone, self, new_layer_lr_mult)

    def stage_modules(self) -> list[nn.Module]:
        """Return the backbone stages from stride 4 on (ResNet layer1..layer4), as timm's feature_info names
        them; forward calls each, so forward hooks on them see (and may replace) every stage's output."""
        info = self.backbone.body.feature_info
        return [self.backbone.body.get_submodule(info[index]["module"]) for index in range(self.low_index, len(info))]

    def stage_strides(self) -> list[int]:
        """Return each of stage_modules()' output strides (timm's reductions, capped at the output stride)."""
        info = self.backbone.body.feature_info
        return [info[index]["reduction"] for index in range(self.low_index, len(info))]


class TorchvisionDeepLabV3(nn.Module):
    """torchvision's deeplabv3_resnet50/101 (output stride 8, no aux head) returning logits at input size."""

    def __init__(self, arch: str, num_classes: int, pretrained: str = "", param_key: str = "seg.pretrained"):
        super().__init__()
        builder = getattr(torchvision.models.segmentation, arch)
        self.net = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        if pretrained:
            load_backbone_file(self.net.backbone, pretrained, param_key)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, num_classes, H, W] at the input size."""
        return self.net(images)["out"]

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the backbone (lr x1) and the DeepLab head (lr x new_layer_lr_mult), all with weight decay."""
        return backbone_and_new_groups(self.net.backbone, self, new_layer_lr_mult)

    def stage_modules(self) -> list[nn.Module]:
        """Return ResNet's layer1..layer4 (strides 4, 8, 8, 8)."""
        return [getattr(self.net.backbone, f"layer{index}") for index in range(1, 5)]

    def stage_strides(self) -> list[int]:
        """Return the strides of layer1..layer4 (dilated from layer3 on: output stride 8)."""
        return [4, 8, 8, 8]


def build_segmenter(arch: str, backbone: str, num_classes: int, pretrained: str = "", output_stride: int = 16,
                    param_key: str = "seg.pretrained", channels: int = ASPP_CHANNELS) -> nn.Module:
    """Return a segmentation network with `mean`, `std` and parameter_groups(); logits at input size.

    pretrained: '' (random init), a local timm/torchvision state dict or one of our checkpoints
    (e.g. the classifier's models/cls.pt), or 'efficientnet_lite0' for the packaged weights.
    `backbone`, `output_stride` and `channels` (ASPP and decoder width) apply to deeplabv3plus only.
    """
    if arch == "deeplabv3plus":
        return DeepLabV3Plus(Backbone(backbone, output_stride, pretrained, param_key), num_classes, channels)
    if arch in SEG_ARCHS:
        return TorchvisionDeepLabV3(arch, num_classes, pretrained, param_key)
    raise ValueError(f"arch must be one of {SEG_ARCHS}, got {arch!r}")
