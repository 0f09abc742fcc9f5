"""The plain CAM classifier (IRN's resnet50_cam): backbone, GAP, bias-free 1x1 classifier."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.models.backbones import Backbone
from wsss_core.models.groups import ParamGroup, backbone_and_new_groups


class CamNet(nn.Module):
    """Multi-label classifier whose 1x1 classifier weights give class activation maps at the backbone's stride."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.channels, num_classes, kernel_size=1, bias=False)
        self.mean, self.std = backbone.mean, backbone.std
        self.cam_stride: int = backbone.output_stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, K] from globally average-pooled features."""
        features = self.backbone(images)  # [B, C, h, w]
        pooled = features.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        return self.classifier(pooled).flatten(1)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """Return ReLU class activation maps [B, K, h, w] at the backbone's stride."""
        return F.relu(self.classifier(self.backbone(images)))

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the backbone (lr x1) and the classifier (lr x new_layer_lr_mult), all with weight decay."""
        return backbone_and_new_groups(self.backbone, self, new_layer_lr_mult)
