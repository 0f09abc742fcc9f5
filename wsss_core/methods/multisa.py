"""`multisa`: Multi-SA (Yaganapu & Kang, CVIU), CAMs from self-attended, stacked and fused backbone taps.

The network is `models.multisa.MultiSANet`; the export stores the fused CAM as `cam` and each tap's
additive share of it as `cam_sa1`..`cam_sak` (SA1 the finest, as the paper's Fig. 4; ReLU'd and
max-normalised like the CAM). The attention lives inside the classifier: no refinement of its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from wsss_core.config import ClsParams, Params, PositiveFloat, PositiveInt
from wsss_core.errors import ParamsError
from wsss_core.methods.base import Method, MethodParams, ModelParams, register_method
from wsss_core.models.catalog import MULTISA_MAX_LAYERS

if TYPE_CHECKING:
    from wsss_core.models.multisa import MultiSANet


class MultiSAModelParams(ModelParams):
    """Multi-SA's network; each default is the spec's recommendation where the paper is silent (spec section 7)."""

    # k: the last k taps attended and stacked; 0 = plain CAM
    layers: Annotated[int, Field(ge=0, le=MULTISA_MAX_LAYERS)] = 3
    scale: Literal["none", "sqrt_d"] = "none"  # attention logits as the paper (none) or / sqrt(d)
    reduction: PositiveInt = 1  # Q/K channels = c / reduction; the paper's is 1 (8: SAGAN's, non-faithful)
    sa_bias: bool = False  # biases in the Q/K/V convs (the equations have none)
    beta_init: float = 0.0  # the gates' initial value: 0 starts from the plain backbone
    inline: bool = False  # feed each attended tap into the next stage instead of side branches
    fuse_bias: bool = False
    classifier_bias: bool = False
    align_corners: bool = False  # of the bilinear resize of V_2..V_k to V_1's size
    bias_lr_mult: PositiveFloat = 2.0  # biases: lr x2 (x20 in new layers) and no weight decay (Puzzle-CAM)
    # Not in the paper: bn_relu normalises and activates each tap before its attention block, so that no tap
    # dominates the stacked CAM by scale (EfficientNet's stride-8/16 taps are signed linear-bottleneck outputs;
    # the paper's ResNet taps are post-ReLU). none: the taps as the backbone gives them.
    tap_norm: Literal["none", "bn_relu"] = "none"


class MultiSAParams(MethodParams):
    model: MultiSAModelParams = MultiSAModelParams()


@register_method
class MultiSAMethod(Method):
    name = "multisa"
    Params = MultiSAParams

    def check(self, params: Params) -> None:
        super().check(params)
        if self.params.model.inline and self.params.model.tap_norm != "none":
            raise ParamsError(f"methods.{self.name}.model.tap_norm {self.params.model.tap_norm!r} normalises side "
                              f"branches; with inline: true the attended taps feed the backbone (give none)")

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> MultiSANet:
        from wsss_core.models.backbones import Backbone
        from wsss_core.models.multisa import MultiSANet

        model = self.params.model
        return MultiSANet(Backbone(cls.backbone, cls.output_stride, cls.pretrained if pretrained else ""),
                          num_classes, layers=model.layers, reduction=model.reduction, scale=model.scale,
                          sa_bias=model.sa_bias, beta_init=model.beta_init, inline=model.inline,
                          fuse_bias=model.fuse_bias, classifier_bias=model.classifier_bias,
                          align_corners=model.align_corners, bias_lr_mult=model.bias_lr_mult,
                          tap_norm=model.tap_norm)

    def cam_maps(self, model: MultiSANet, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raw, shares = model.layer_cams(images)
        maps = {"cam": F.relu(raw)}
        if len(shares) > 1:
            maps.update({f"cam_sa{index}": F.relu(share) for index, share in enumerate(shares, 1)})
        return maps

    def learned_values(self, model: MultiSANet) -> dict[str, float]:
        return {f"beta_sa{index}": beta for index, beta in enumerate(model.gates(), 1)}
