"""`toy`: a test-only second method that proves the method interface (not shipped).

It is plain CAM plus what the seed methods need from the platform: a raw map stored as it is
(the stride-resolution CAM of both views), a refinement with a param of its own
(`methods.toy.refine.power`) that reads that raw map, a model param (`methods.toy.model.width`,
an extra 1x1 layer), a loss with parts, and a segmentation branch (`pseudo.source: export`).
Tests register it with `register_method(ToyMethod)` (or copy it into a repo's methods/).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.config import ClsParams
from wsss_core.cams.store import RawMap
from wsss_core.methods.base import Method, MethodParams, ModelParams, RefineParams
from wsss_core.models.backbones import Backbone
from wsss_core.models.cam_net import CamNet
from wsss_core.models.groups import ParamGroup


class ToyModel(ModelParams):
    width: int = 8  # channels of the extra 1x1 layer before the classifier


class ToyRefine(RefineParams):
    power: float = 1.0  # refined = normalise((cam * raw CAM) ** power)


class ToyParams(MethodParams):
    model: ToyModel = ToyModel()
    refine: ToyRefine = ToyRefine()


class ToyNet(CamNet):
    """CamNet with a 1x1 conv + ReLU of `width` channels between backbone and classifier; a bias-free gate."""

    def __init__(self, backbone: nn.Module, num_classes: int, width: int):
        nn.Module.__init__(self)
        self.backbone = backbone
        self.squeeze = nn.Conv2d(backbone.channels, width, 1)
        self.classifier = nn.Conv2d(width, num_classes, 1, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))  # like Multi-SA's beta: new, no weight decay
        self.mean, self.std, self.cam_stride = backbone.mean, backbone.std, backbone.output_stride

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.squeeze(self.backbone(images))) * (1 + self.gate)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean((2, 3), keepdim=True)).flatten(1)

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.features(images)))

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        return [ParamGroup("backbone", list(self.backbone.parameters())),
                ParamGroup("new", [*self.squeeze.parameters(), *self.classifier.parameters()], new_layer_lr_mult),
                ParamGroup("gate", [self.gate], new_layer_lr_mult, weight_decay=False)]


class ToySegmenter(nn.Module):
    """Segmentation logits [B, K+1, h, w] from the CAMs: background 0.5, class c its CAM (a stand-in branch)."""

    def __init__(self, model: ToyNet):
        super().__init__()
        self.model, self.mean, self.std = model, model.mean, model.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cams = self.model.cams(images)
        cams = cams / (cams.flatten(2).amax(2)[..., None, None] + 1e-5)
        return torch.cat([torch.full_like(cams[:, :1], 0.5), cams], 1) * 10


class ToyMethod(Method):
    name = "toy"
    Params = ToyParams
    refines = True
    has_segmenter = True

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> ToyNet:
        backbone = Backbone(cls.backbone, cls.output_stride, cls.pretrained if pretrained else "")
        return ToyNet(backbone, num_classes, self.params.model.width)

    def training_loss(self, model: ToyNet, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["images"])
        classification = F.multilabel_soft_margin_loss(logits, batch["labels"])
        sparsity = 1e-3 * model.cams(batch["images"]).mean()
        return classification + sparsity, {"classification": classification.item(), "sparsity": sparsity.item()}

    def cam_maps(self, model: ToyNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": model.cams(images)}

    def raw_maps(self, model: ToyNet, images: torch.Tensor) -> dict[str, RawMap]:
        cams = model.cams(images)  # [N, K, h, w] at the CAM stride
        return {"stride_cam": RawMap(cams, "classes,height,width", tuple(cams.shape[-2:]))}

    def segmenter(self, model: ToyNet) -> nn.Module:
        return ToySegmenter(model)

    def refine(self, cam: np.ndarray, keys: np.ndarray, raw: dict[str, np.ndarray]) -> np.ndarray:
        params: ToyRefine = self.params.refine
        if cam.shape[0] == 0:
            return cam
        stride_cam = torch.from_numpy(raw["stride_cam"][0][keys - 1])[None]  # view 0, the image's classes
        upsampled = F.interpolate(stride_cam, cam.shape[1:], mode="bilinear", align_corners=False)[0].numpy()
        upsampled /= upsampled.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5
        refined = (cam * upsampled) ** params.power
        return refined / (refined.reshape(len(keys), -1).max(1)[:, None, None] + 1e-5)
