"""timm backbones that return a dense feature map, with local/package pretrained weights."""
from __future__ import annotations

import timm
import torch
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CNN_BACKBONES
from wsss_core.models.pretrained import LITE0_PACKAGE_NAME, load_backbone_file, load_lite0_package_weights


class Backbone(nn.Module):
    """A timm model without its head: forward(x [B,3,H,W]) -> features [B, C, H/stride, W/stride]."""

    def __init__(self, name: str, output_stride: int = 16, pretrained: str = "", param_key: str = "cls.pretrained"):
        super().__init__()
        if name not in CNN_BACKBONES:
            raise ParamsError(f"backbone {name!r} is not one of: {', '.join(CNN_BACKBONES)}")
        self.body = timm.create_model(name, pretrained=False, output_stride=output_stride)
        if pretrained == LITE0_PACKAGE_NAME:
            if name != "tf_efficientnet_lite0":
                raise ParamsError(f"{param_key}={LITE0_PACKAGE_NAME} needs backbone tf_efficientnet_lite0, not {name}")
            load_lite0_package_weights(self.body)
        elif pretrained:
            load_backbone_file(self.body, pretrained, param_key)
        self.body.reset_classifier(0, "")
        self.output_stride = output_stride
        self.channels: int = self.body.num_features
        config = self.body.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(config["mean"])
        self.std: tuple[float, float, float] = tuple(config["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(images)
