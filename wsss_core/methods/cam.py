"""`cam`: the plain CAM baseline (IRN's resnet50_cam on a configurable timm backbone)."""
from __future__ import annotations

import torch
from torch import nn

from wsss_core.config import ClsParams
from wsss_core.methods.base import Method
from wsss_core.models.backbones import Backbone
from wsss_core.models.cam_net import CamNet


class CamMethod(Method):
    name = "cam"

    def build_classifier(self, params: ClsParams, num_classes: int) -> CamNet:
        return CamNet(Backbone(params.backbone, params.output_stride, params.pretrained), num_classes)

    def cam_maps(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": model.cams(images)}
