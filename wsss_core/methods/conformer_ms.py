"""`conformer_ms`: the improved Conformer of Shen & Wang (CMC 2025): CSConv, Etrans and MFUC on TransCAM.

The network is `models.conformer_ms` (`build_conformer_ms`): a pyramid CNN branch of cross-scale CSConv blocks,
efficient attention (keys and values pooled by r = 2, q/k/v split in s = 4) and MFUC coupling with learnable
alphas, each switchable on its own (`model.csconv.enabled`, `model.etrans.enabled`, `model.mfuc.enabled`), so
the paper's Table 1 is a set of `-S` overrides: all three off is TransCAM's network (the "Standard" row), Etrans
alone its second row, all on the paper's method. Loss, export and refinement are `transcam`'s: the CAM logits
(upsampled from stride 32 to the token grid, spec 2.7 step 3) times the attention averaged over heads and splits
and summed over the blocks (TransCAM's sum; the spec's mean differs by the factor 12, which min-max removes),
whose pooled key columns are spread evenly back over the patches they pooled (step 2). The MFUCs' mean |alpha_x|
and |alpha_c| are logged. Spec: ../shared/methods/conformer.md; the section-7 gaps of the network are params at
their recommended defaults, except the CSConv normalisation and activation (BN + GELU), the pyramid widths and
the fusion (resize to the 1/32 grid, sum, BN), which are fixed.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from wsss_core.config import ClsParams, Fraction, Params, PositiveInt, Section
from wsss_core.errors import ParamsError
from wsss_core.methods.base import register_method
from wsss_core.methods.transcam import TransCAMMethod, TransCAMModelParams, TransCAMParams
from wsss_core.models.catalog import CONFORMER_SIZES


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
    every: PositiveInt = 1  # an MFUC before blocks start, start + every, ...; 3: ViT-CoMer's layout
    start: Annotated[int, Field(ge=2, le=12)] = 2  # the first block with an MFUC (the paper: from the second)
    alpha_init: float = 0.0  # 0: the coupling starts as the identity (pretrained branches undisturbed)
    separate_alpha: bool = True  # alpha_x (eq. 9) and alpha_c (eq. 10) apart; false: the paper's single alpha


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

    def check(self, params: Params) -> None:
        super().check(params)
        model, size = self.params.model, CONFORMER_SIZES[params.cls.backbone]
        dim, heads, path = size["embed_dim"], size["num_heads"], f"methods.{self.name}.model"
        even = [kernel for kernel in model.csconv.kernels if kernel % 2 == 0]
        inner = model.etrans.inner_dim or dim
        hidden = int(dim * model.csconv.hidden_ratio)
        faults = [
            (model.csconv.enabled and even, f"csconv.kernels: {even[:1]} is even; depthwise kernels must be odd"),
            (model.csconv.enabled and hidden % len(model.csconv.kernels),
             f"csconv.hidden_ratio: {hidden} hidden channels do not split into {len(model.csconv.kernels)} groups"),
            (model.etrans.enabled and inner % (heads * (model.etrans.splits if model.etrans.split_mode == "channel"
                                                         else 1)),
             f"etrans.inner_dim: {inner} does not split into {heads} heads x {model.etrans.splits} parts"),
            (model.mfuc.enabled and dim % model.mfuc.heads, f"mfuc.heads: {model.mfuc.heads} do not divide D = {dim}"),
        ]
        for fault, message in faults:
            if fault:
                raise ParamsError(f"{path}.{message} ({params.cls.backbone})")

    def network(self, cls: ClsParams, num_classes: int) -> nn.Module:
        """Return the ablation row's network (`build_conformer_ms`) with K + 1 outputs per head."""
        from wsss_core.models.conformer_ms import build_conformer_ms

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
            mfuc_ffn_ratio=model.mfuc.ffn_ratio, mfuc_every=model.mfuc.every, mfuc_start=model.mfuc.start,
            mfuc_alpha_init=model.mfuc.alpha_init, mfuc_separate_alpha=model.mfuc.separate_alpha)

    def learned_values(self, model) -> dict[str, float]:
        """Return the mean |alpha_x| and |alpha_c| over the MFUCs (0 at initialisation), when there are any."""
        from wsss_core.models.conformer_ms import MFUC

        couplings = [module for module in model.modules() if isinstance(module, MFUC)]
        if not couplings:
            return {}
        return {"alpha_x": torch.stack([m.alpha_x.detach().abs().mean() for m in couplings]).mean().item(),
                "alpha_c": torch.stack([m.alpha_c.detach().abs().mean() for m in couplings]).mean().item()}
