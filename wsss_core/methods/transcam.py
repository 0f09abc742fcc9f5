"""`transcam`: TransCAM (Li et al., JVCI 2023), Conformer CAMs refined by the transformer's attention.

The classifier is `models.conformer.Conformer` with TransCAM's two changes (the last fusion block keeps
stride 16, a 3x3 conv CAM head), K + 1 outputs per head (channel 0 the background, never supervised),
trained with the multi-label soft margin on the sum of the conv and transformer logits (TransCAM's loss;
spec section 3). The export stores the multi-scale ReLU'd conv CAM as `cam` (TransCAM's `convcam`) and,
per `export.sizes`, raw maps at token resolution: `cam_logits_<size>` [K, h, w] and `attention_<size>`
(head-averaged attention summed over the blocks [1 + N, 1 + N], or each block's [L, 1 + N, 1 + N] with
export.attention: layers). `refine` multiplies them per stored view and size (TransCAM's `transcam`:
refined[c, p] = sum_q A[p, q] cam[c, q]), upsamples to the image, sums the flips and sizes, clamps at 0
and min-max normalises per class as TransCAM's infer script does.

Deviations from TransCAM's code (github.com/liruiwen/TransCAM): the `cam` export ReLUs each pass before
merging (the stages' contract: non-negative maps; TransCAM clamps the sum), and images are resized on
tensors (bicubic for the squares, TransCAM resizes the PIL image); its normalisation sets pixels below
min + 1e-5 to (-min - 1e-5) / (max - min + 1e-5), ours to 0. Spec: ../shared/methods/conformer.md, sections 2.1, 2.7, 4.2.
"""
from __future__ import annotations

import sys
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss_core.cams.attention import TRANSCAM_MODES, attention_refine
from wsss_core.cams.store import RawMap
from wsss_core.config import ClsParams, NonNegativeInt, Params
from wsss_core.errors import ParamsError
from wsss_core.methods.base import (ExportParams, Method, MethodParams, ModelParams, RefineParams,
                                    chosen_blocks, register_method, sum_blocks)
from wsss_core.models.catalog import CONFORMER_BACKBONES, CONFORMER_DEPTH


class TransCAMModelParams(ModelParams):
    """TransCAM's network on the Conformer size cls.backbone (spec 2.1)."""

    head_kernel: Literal[1, 3] = 3  # the conv CAM head (TransCAM: 3x3; 1 is the classic linear CAM)
    drop_path: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # stochastic depth, rising over the blocks (Conformer-S)
    # sum: the soft margin of conv + transformer logits (TransCAM); separate: each head's own soft margin, summed
    # (Conformer's own training), so the transformer learns even when the conv branch already classifies.
    loss: Literal["sum", "separate"] = "sum"


class TransCAMExportParams(ExportParams):
    # The sizes the attention and CAM logits are stored at, with the flip view: 0 = the image's own size (each
    # side rounded to the network's input multiple), k = squashed to k x k (TransCAM: 256, 512, 768).
    sizes: Annotated[list[NonNegativeInt], Field(min_length=1)] = [0]
    attention: Literal["sum", "layers"] = "sum"  # summed over the blocks (TransCAM), or each block's


class TransCAMRefineParams(RefineParams):
    """TransCAM's refinement (spec 2.7); every default is TransCAM's."""

    mode: Literal[TRANSCAM_MODES] = "transcam"  # attnagg: the transposed product; clsattn: cls attention x CAM
    layers: Literal["all"] | Annotated[list[int], Field(min_length=1)] = "all"  # a list needs export.attention: layers
    flip: bool = True  # add the mirror views (stored when cams.flip)


class TransCAMParams(MethodParams):
    model: TransCAMModelParams = TransCAMModelParams()
    export: TransCAMExportParams = TransCAMExportParams()
    refine: TransCAMRefineParams = TransCAMRefineParams()


def fit_input(images: torch.Tensor, multiple: int, size: int = 0) -> torch.Tensor:
    """Return images [B, 3, H', W'] the network takes: squashed to size x size (bicubic) when size > 0, else each
    side rounded to the nearest multiple of `multiple` (at least one; bilinear, unchanged when it already fits)."""
    if size:
        if size % multiple:
            raise ValueError(f"size {size} is not a multiple of {multiple}")
        return F.interpolate(images, (size, size), mode="bicubic", align_corners=False)
    target = tuple(max(multiple, round(side / multiple) * multiple) for side in images.shape[-2:])
    if target == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, target, mode="bilinear", align_corners=False)


def size_label(size: int) -> str:
    """Return the raw-map suffix of an export size: 'native' for 0, else the size."""
    return str(size) if size else "native"


def transcam_normalize(total: torch.Tensor) -> np.ndarray:
    """Return per-class maps [k, H, W] in [0, 1) from merged CAMs [k, H, W]: clamped at 0, then
    (x - min - 1e-5) / (max - min + 1e-5) with pixels below min + 1e-5 at 0 (TransCAM's; a constant map is 0)."""
    total = total.clamp(min=0)
    low = total.flatten(1).amin(1)[:, None, None]
    high = total.flatten(1).amax(1)[:, None, None]
    return ((total - low - 1e-5).clamp(min=0) / (high - low + 1e-5)).numpy()


@register_method
class TransCAMMethod(Method):
    name = "transcam"
    Params = TransCAMParams
    refines = True
    backbones = CONFORMER_BACKBONES
    input_multiple: int = 16  # input sides must be multiples of this: the token stride of every Conformer size

    def check(self, params: Params) -> None:
        super().check(params)
        export, refine = self.params.export, self.params.refine
        if refine.layers != "all":
            if export.attention == "sum":
                raise ParamsError(f"methods.{self.name}.refine.layers: choosing blocks needs "
                                  f"methods.{self.name}.export.attention: layers (the store would hold their sum only)")
            chosen_blocks(refine.layers, CONFORMER_DEPTH, f"methods.{self.name}.refine.layers")
        multiple = self.input_multiple
        odd = [size for size in export.sizes if size % multiple]
        if odd:
            raise ParamsError(f"methods.{self.name}.export.sizes: {odd[0]} is not a multiple of {multiple} "
                              f"(0: the image's own size)")

    def network(self, cls: ClsParams, num_classes: int) -> nn.Module:
        """Return the randomly initialised network with K + 1 outputs per head (channel 0: background)."""
        from wsss_core.models.conformer import build_conformer

        model = self.params.model
        return build_conformer(cls.backbone, num_classes + 1, cam_head_kernel=model.head_kernel,
                               drop_path=model.drop_path)

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> nn.Module:
        from wsss_core.models.conformer import load_conformer_weights

        network = self.network(cls, num_classes)
        if pretrained and cls.pretrained:
            skipped = load_conformer_weights(network, cls.pretrained)
            print(f"cls.pretrained: {cls.pretrained}: {len(skipped)} checkpoint keys not loaded: "
                  f"{', '.join(skipped[:8])}{', ...' if len(skipped) > 8 else ''}", file=sys.stderr)
        return network

    def logits(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the network's (conv logits, transformer logits, CAM logits) without the background channel."""
        conv, trans, cam = model(fit_input(images, self.input_multiple))
        return conv[:, 1:], trans[:, 1:], cam[:, 1:]

    def training_loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        conv, trans, _ = self.logits(model, batch["images"])
        labels = batch["labels"]
        conv_loss, trans_loss = (F.multilabel_soft_margin_loss(logits, labels) for logits in (conv, trans))
        loss = (F.multilabel_soft_margin_loss(conv + trans, labels) if self.params.model.loss == "sum"
                else conv_loss + trans_loss)
        return loss, {"conv": conv_loss.item(), "trans": trans_loss.item()}

    def class_scores(self, model, images: torch.Tensor) -> torch.Tensor:
        conv, trans, _ = self.logits(model, images)
        return conv + trans

    def cam_maps(self, model, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": F.relu(self.logits(model, images)[2])}

    def raw_maps(self, model, images: torch.Tensor) -> dict[str, RawMap]:
        maps = {}
        for size in self.params.export.sizes:
            cam_logits, attention = model.cam_and_attention(fit_input(images, self.input_multiple, size))
            grid, label = tuple(cam_logits.shape[-2:]), size_label(size)  # the token grid (a stride-32 CAM resized)
            maps[f"cam_logits_{label}"] = RawMap(cam_logits[:, 1:], "classes,height,width", grid)
            maps[f"attention_{label}"] = (RawMap(attention.transpose(0, 1), "layers,tokens,tokens", grid)
                                          if self.params.export.attention == "layers"
                                          else RawMap(attention.sum(0), "tokens,tokens", grid))
        return maps

    def refine(self, cam: np.ndarray, keys: np.ndarray, raw: dict[str, np.ndarray]) -> np.ndarray:
        params: TransCAMRefineParams = self.params.refine
        if len(keys) == 0:
            return cam
        present = keys - 1
        total = torch.zeros(cam.shape)
        for name in sorted(raw):
            if not name.startswith("cam_logits_"):
                continue
            views = raw[name].shape[0] if params.flip else 1
            attention = torch.from_numpy(raw["attention_" + name.removeprefix("cam_logits_")][:views])
            if attention.ndim == 4:  # [V, L, 1 + N, 1 + N]
                attention = sum_blocks(attention, params.layers, f"methods.{self.name}.refine.layers")
            elif params.layers != "all":
                raise ParamsError(f"methods.{self.name}.refine.layers: the store holds the sum over all blocks; "
                                  f"choosing blocks needs methods.{self.name}.export.attention: layers")
            refined = attention_refine(torch.from_numpy(raw[name][:views, present]), attention, params.mode)
            maps = F.interpolate(refined, cam.shape[1:], mode="bilinear", align_corners=False)  # [V, k, H, W]
            total += maps[0] + maps[1].flip(-1) if views == 2 else maps[0]  # the mirror view flipped back
        return transcam_normalize(total)
