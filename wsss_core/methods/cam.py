"""`cam`: the plain CAM baseline (IRN's resnet50_cam on a configurable timm backbone); no refinement."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from wsss_core.config import ClsParams
from wsss_core.methods.base import Method, register_method

if TYPE_CHECKING:
    from wsss_core.models.cam_net import CamNet


@register_method
class CamMethod(Method):
    name = "cam"

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> CamNet:
        from wsss_core.models.backbones import Backbone
        from wsss_core.models.cam_net import CamNet

        return CamNet(Backbone(cls.backbone, cls.output_stride, cls.pretrained if pretrained else ""), num_classes)

    def cam_maps(self, model: CamNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": model.cams(images)}
