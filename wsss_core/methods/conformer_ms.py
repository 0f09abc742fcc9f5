"""`conformer_ms`: the improved Conformer of Shen & Wang (CMC 2025): CSConv, Etrans and MFUC on TransCAM.

The network is `models.conformer_ms` (`build_conformer_ms`): a pyramid CNN branch of cross-scale CSConv blocks,
efficient attention (keys and values pooled by r = 2, q/k/v split in s = 4) and MFUC coupling with learnable
alphas, each switchable on its own (`model.csconv.enabled`, `model.etrans.enabled`, `model.mfuc.enabled`), so
the paper's Table 1 is a set of `-S` overrides: all three off is TransCAM's network (the "Standard" row), Etrans
alone its second row, all on the paper's method. Loss, export and refinement are `transcam`'s: the CAM logits
(upsampled from stride 32 to the token grid, spec 2.7 step 3) times the head-, split- and block-averaged
attention, whose pooled key columns are spread evenly back over the patches they pooled (step 2). The MFUCs'
mean |alpha_x| and |alpha_c| are logged. Spec: ../shared/methods/conformer.md; every section-7 gap is a param
at its recommended default.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from wsss_core.config import ClsParams, Fraction, PositiveInt, Section
from wsss_core.methods.base import register_method
from wsss_core.methods.transcam import TransCAMMethod, TransCAMModelParams, TransCAMParams
from wsss_core.models.conformer_ms import MFUC, build_conformer_ms


class CSConvParams(Section):
    """The cross-scale conv block (spec 2.4, eq. 1): FC down, one depthwise conv per channel group, FC up."""

    enabled: bool = True  # off: the pyramid is carried unchanged (with mfuc) or TransCAM's CNN branch (without)
    kernels: Annotated[list[PositiveInt], Field(min_length=1)] = [3, 5]  # one group per kernel (M = 2)
    hidden_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # D_hid = D / 2
    residual: bool = True  # identity skip around the block (not in eq. 1; ViT-CoMer's MRFP has one)


class EtransParams(Section):
    """Efficient self-attention (spec 2.5, eqs. 3-7)."""

    enabled: bool = True  # off: standard multi-head self-attention
    sr_ratio: PositiveInt = 2  # keys/values pooled by r after projection (1: none)
    sr_mode: Literal["pool1x2", "pool2x2"] = "pool1x2"  # 1 x r windows (N -> N/r) or PVT's r x r (N -> N/r^2)
    splits: PositiveInt = 4  # s
    split_mode: Literal["channel", "spatial"] = "channel"  # the shapes' reading, or the O(N^2/(s r)) one
    inner_dim: Annotated[int, Field(ge=0)] = 0  # D_h; 0: D (Conformer weights load); 96 at D 384: `paper_budget`
    scale: Literal["head", "split"] = "head"  # softmax temperature sqrt(d) (the paper) or sqrt(d / s)


class MFUCParams(Section):
    """Multi-feature coupling (spec 2.6, eqs. 8-10): deformable attention over the pyramid, alphas start at 0."""

    enabled: bool = True  # off: Conformer's FCU coupling (with csconv) or TransCAM's network (without)
    heads: PositiveInt = 6
    points: PositiveInt = 4
    ffn_ratio: Fraction = 0.25  # ConvFFN hidden width / D
    every: PositiveInt = 1  # an MFUC before blocks 2, 2 + every, ...; 3: ViT-CoMer's layout


class ConformerMSModelParams(TransCAMModelParams):
    csconv: CSConvParams = CSConvParams()
    etrans: EtransParams = EtransParams()
    mfuc: MFUCParams = MFUCParams()
    # 0: the network's own (32 for the improved network, 16 for TransCAM's when csconv and mfuc are off);
    # 16: the pyramid fused to stride 16 (TransCAM-like); 32 with both off: Conformer's stride-2 last block.
    cam_stride: Literal[0, 16, 32] = 0


class ConformerMSParams(TransCAMParams):
    model: ConformerMSModelParams = ConformerMSModelParams()


@register_method
class ConformerMSMethod(TransCAMMethod):
    name = "conformer_ms"
    Params = ConformerMSParams

    @property
    def input_multiple(self) -> int:
        """32 for the pyramid network (every level exact), 16 for TransCAM's."""
        model = self.params.model
        return 32 if model.csconv.enabled or model.mfuc.enabled else 16

    def network(self, cls: ClsParams, num_classes: int) -> nn.Module:
        """Return the ablation row's network (`build_conformer_ms`) with K + 1 outputs per head."""
        model = self.params.model
        etrans = model.etrans
        attention = None
        if etrans.enabled:
            attention = {"sr_ratio": etrans.sr_ratio, "sr_mode": etrans.sr_mode, "splits": etrans.splits,
                         "split_mode": etrans.split_mode, "inner_dim": etrans.inner_dim or None, "scale": etrans.scale}
        return build_conformer_ms(
            cls.backbone, num_classes + 1, csconv=model.csconv.enabled, etrans=attention, mfuc=model.mfuc.enabled,
            cam_stride=model.cam_stride or None, cam_head_kernel=model.head_kernel, drop_path=model.drop_path,
            csconv_kernels=tuple(model.csconv.kernels), csconv_hidden_ratio=model.csconv.hidden_ratio,
            csconv_residual=model.csconv.residual, mfuc_heads=model.mfuc.heads, mfuc_points=model.mfuc.points,
            mfuc_ffn_ratio=model.mfuc.ffn_ratio, mfuc_every=model.mfuc.every)

    def learned_values(self, model) -> dict[str, float]:
        """Return the mean |alpha_x| and |alpha_c| over the MFUCs (0 at initialisation), when there are any."""
        couplings = [module for module in model.modules() if isinstance(module, MFUC)]
        if not couplings:
            return {}
        return {"alpha_x": torch.stack([m.alpha_x.detach().abs().mean() for m in couplings]).mean().item(),
                "alpha_c": torch.stack([m.alpha_c.detach().abs().mean() for m in couplings]).mean().item()}
