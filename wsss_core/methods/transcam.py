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
from functools import cached_property
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss_core.cams.attention import TRANSCAM_MODES, attention_refine, object_attention_mass, object_tokens
from wsss_core.cams.store import CamStore, RawMap
from wsss_core.config import ClsParams, NonNegativeInt, Params, PositiveFloat
from wsss_core.data.dataset import Dataset
from wsss_core.errors import ParamsError
from wsss_core.methods.base import (ExportParams, Method, MethodParams, ModelParams, RefineParams,
                                    chosen_blocks, register_method, sum_blocks)
from wsss_core.models.catalog import CNN_BACKBONES, CONFORMER_BACKBONES, CONFORMER_DEPTH


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
    # What the stored patch-to-patch attention is: the network's (TransCAM), or imagenet_features, a deviation for
    # networks trained from scratch, whose attention is no affinity (docs/methods/conformer.md): softmax_j(cos(f_i,
    # f_j) / affinity_temperature) of a packaged ImageNet CNN's stride-16 features (affinity_backbone, weights from
    # affinity_pretrained) resized to the token grid, the cls token's row and column 0. The CAM logits stay the
    # network's.
    attention_source: Literal["network", "imagenet_features"] = "network"
    affinity_backbone: str = "tf_efficientnet_lite0"
    affinity_pretrained: str = "efficientnet_lite0"
    affinity_temperature: PositiveFloat = 0.1


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
        if export.attention_source == "imagenet_features":
            if export.attention == "layers":
                raise ParamsError(f"methods.{self.name}.export.attention: layers has no blocks to store with "
                                  f"attention_source imagenet_features (one affinity per view); give sum")
            if refine.mode == "clsattn":
                raise ParamsError(f"methods.{self.name}.refine.mode: clsattn reads the cls token's attention, which "
                                  f"export.attention_source imagenet_features does not have")
            if export.affinity_backbone not in CNN_BACKBONES:
                raise ParamsError(f"methods.{self.name}.export.affinity_backbone {export.affinity_backbone!r} is not "
                                  f"one of: {', '.join(CNN_BACKBONES)}")
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
        export, maps = self.params.export, {}
        for size in export.sizes:
            fitted = fit_input(images, self.input_multiple, size)
            cam_logits, attention = model.cam_and_attention(fitted)
            grid, label = tuple(cam_logits.shape[-2:]), size_label(size)  # the token grid (a stride-32 CAM resized)
            maps[f"cam_logits_{label}"] = RawMap(cam_logits[:, 1:], "classes,height,width", grid)
            if export.attention_source == "imagenet_features":
                maps[f"attention_{label}"] = RawMap(self.imagenet_affinity(model, fitted, grid), "tokens,tokens", grid)
            elif export.attention == "layers":
                maps[f"attention_{label}"] = RawMap(attention.transpose(0, 1), "layers,tokens,tokens", grid)
            else:
                maps[f"attention_{label}"] = RawMap(attention.sum(0), "tokens,tokens", grid)
        return maps

    @cached_property
    def affinity_network(self) -> nn.Module:
        """Return export.affinity_backbone at stride 16 with export.affinity_pretrained's weights, in eval mode."""
        from wsss_core.models.backbones import Backbone

        export = self.params.export
        return Backbone(export.affinity_backbone, 16, export.affinity_pretrained,
                        f"methods.{self.name}.export.affinity_pretrained").eval()

    def imagenet_affinity(self, model, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Return [B, 1 + N, 1 + N]: the affinity (models.hooks.feature_affinity) of export.affinity_backbone's
        stride-16 features of images [B, 3, H, W] (normalised for `model`, renormalised for the backbone), resized
        bilinearly to the token grid, in the patch-to-patch block; the cls token's row and column 0."""
        from wsss_core.models.hooks import feature_affinity

        network = self.affinity_network.to(images.device)

        def column(values) -> torch.Tensor:
            return torch.tensor(values, dtype=images.dtype, device=images.device)[:, None, None]

        pixels = images * column(model.std) + column(model.mean)
        with torch.no_grad():
            features = network((pixels - column(network.mean)) / column(network.std))
        features = F.interpolate(features.float(), grid, mode="bilinear", align_corners=False)
        patches = feature_affinity(features, self.params.export.affinity_temperature)  # [B, N, N]
        return F.pad(patches, (1, 0, 1, 0))

    def attention_statistics(self, store: CamStore, dataset: Dataset, ids: list[str]) -> dict:
        """Return, over the images with a mask (view 0 of the attention at export.sizes' first, blocks summed over
        refine.layers, the patch-to-patch block): the mean share of object / background queries' attention on
        object tokens and the object tokens' share of the grid (cams.attention.object_attention_mass; an affinity
        puts more from object queries)."""
        samples = []
        for image_id in ids:
            if not dataset.has_mask(image_id):
                continue
            raw = store.read_raw(image_id)
            name = f"attention_{size_label(self.params.export.sizes[0])}"
            attention = torch.from_numpy(raw[name][:1])
            if attention.ndim == 4:  # [1, L, 1 + N, 1 + N]
                attention = sum_blocks(attention, self.params.refine.layers, f"methods.{self.name}.refine.layers")
            _, grid = store.raw_layout(image_id, name)
            samples.append((attention[0, 1:, 1:].numpy(), object_tokens(dataset.read_mask(image_id), grid)))
        return object_attention_mass(samples)

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
