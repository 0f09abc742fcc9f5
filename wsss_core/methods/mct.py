"""`mct`: MCTformer-V2 (Xu et al., CVPR 2022), the class-token transformer the semantic-modulation paper builds on.

The classifier is `models.mctformer.MCTformerV2` on a timm DeiT, trained with the class-token and the
patch-CAM multi-label losses (spec eqs. 7-11, parts `token` and `patch`). The export stores the
multi-scale ReLU'd patch CAM as `cam` (the paper's Original-CAM) and, at scale 1 with the flip view,
raw maps at token resolution: `patch_cam` (the CAM logits [C, h, w]), `c2p` (each block's head-averaged
class-to-patch attention [L, C, N]) and `p2p` (patch-to-patch attention summed over all blocks [N, N],
or each block's [L, N, N] with export.p2p: layers; with export.p2p_source: token_features, a deviation for
hybrid tokens, the softmax of the token backbone's feature cosines [N, N] instead). `refine` fuses them as MCTformer-V2 does: ReLU(CAM)
x class-to-patch attention of the last 3 blocks, then the patch-to-patch product, per view, upsampled,
flip-summed and min-max normalised per class; with `refine.modulation.enabled` the class-to-patch
attention is first semantically modulated (method `semod`). A present class whose final map is constant (e.g.
its CAM is negative everywhere) is all zeros after min-max, as in MCTformer. The ranking of the semantic
neighbours reads the stored float16 attention, so near-equal entries can tie (broken by topk).
Spec: ../shared/methods/semantic_modulation.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from wsss_core.cams.attention import (ROUNDINGS, class_map_correlation, joint_refine, object_attention_mass,
                                      object_tokens, semantic_modulation)
from wsss_core.cams.store import CamStore, RawMap
from wsss_core.config import ClsParams, NonNegativeFloat, NonNegativeInt, Params, PositiveFloat, Section
from wsss_core.data.dataset import Dataset
from wsss_core.errors import ParamsError
from wsss_core.methods.base import (ExportParams, Method, MethodParams, ModelParams, RefineParams,
                                    chosen_blocks, register_method, sum_blocks)
from wsss_core.models.catalog import CNN_BACKBONES, DEIT_DEPTH, VIT_BACKBONES

if TYPE_CHECKING:
    from wsss_core.models.mctformer import MCTformerV2


class MCTModelParams(ModelParams):
    """MCTformer-V2's network (spec 2.1): the backbone is cls.backbone (a DeiT)."""

    head_kernel: Literal[1, 3] = 3  # the conv CAM head's kernel (MCTformer-V2: 3x3; the paper says "Conv")
    final_norm: bool = False  # timm's final LayerNorm before the heads (MCTformer's code: not applied)
    drop_path: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # stochastic depth while training (MCTformer)
    depth: NonNegativeInt = 0  # transformer blocks; 0: the backbone's (DeiT: 12)
    patch_size: NonNegativeInt = 0  # patch (and CAM) stride; 0: the backbone's (DeiT: 16)
    # Weight of the class-token loss (spec eq. 7; 1 in MCTformer). 0 is the switch-off control: the class
    # tokens get no signal, so their attention is not class-specific; val mAP then comes from the patch CAM.
    token_loss_weight: NonNegativeFloat = 1.0
    # The patch CAM's pooling into the patch loss's scores: global weighted ranking pooling with this decay
    # (models.mctformer.ranked_pooling). 1 is MCTformer-V2's GAP, which rewards every token for carrying the
    # class; MCTformer+ (xulianuwa/MCTformer's later models.py) uses 0.996.
    patch_pooling_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    # Hybrid tokens, a deviation for the cpu profile (docs/methods/semantic_modulation.md): "" keeps
    # MCTformer-V2's 16x16 patch convolution; a CNN of the CNN list makes the patch tokens its
    # stride-`token_backbone_stride` features projected 1x1 to the width, its weights from
    # `token_backbone_pretrained` (the packaged ImageNet Lite0, or a local file), trained at
    # lr x token_backbone_lr_mult (0: frozen, batch-norm statistics too).
    token_backbone: str = ""
    token_backbone_pretrained: str = "efficientnet_lite0"
    token_backbone_stride: Literal[8, 16, 32] = 16
    token_backbone_lr_mult: NonNegativeFloat = 0.1


class MCTExportParams(ExportParams):
    # sum: patch-to-patch attention summed over all blocks, N^2 values per view (MCTformer; the spec's storage
    # advice); layers: each block's, L x N^2 per view, so that refine.p2p_layers can pick blocks.
    p2p: Literal["sum", "layers"] = "sum"
    # What the stored patch-to-patch map is: the network's attention (MCTformer), or token_features, a deviation
    # for hybrid tokens trained from scratch (docs/methods/semantic_modulation.md): softmax_j(cos(f_i, f_j) /
    # affinity_temperature) of the token backbone's ImageNet features, the affinity that a pretrained ViT's
    # attention stands for. The class-to-patch attention stays the network's.
    p2p_source: Literal["attention", "token_features"] = "attention"
    affinity_temperature: PositiveFloat = 0.1


class ModulationParams(Section):
    """Semantic modulation (spec 2.5): c2p(c, i) += alpha * mean of c2p(c, j) over the top `ratio` patches j of p2p row i."""

    enabled: bool = False
    ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3  # the paper's 30%
    alpha: NonNegativeFloat = 1.2  # the paper's
    exclude_self: bool = False  # the patch itself may be among its neighbours (plain top-k; spec 7.3b)
    rounding: Literal[tuple(ROUNDINGS)] = "floor"  # S = max(1, floor(ratio * N)) (spec 7.3c)


class MCTRefineParams(RefineParams):
    """The fusion of the stored maps (spec 2.4, 2.6, 2.7); every default is the spec's recommendation."""

    c2p_layers: Annotated[list[int], Field(min_length=1)] = [-3, -2, -1]  # 0-based blocks (negative: from the end), summed
    p2p_layers: Literal["all"] | Annotated[list[int], Field(min_length=1)] = "all"  # a list needs export.p2p: layers
    use_cam: bool = True  # false: the class-to-patch attention alone (MCTformer-V1's CAM)
    use_c2p: bool = True  # false: Table 4's "initial CAM + patch-to-patch"
    use_p2p: bool = True  # false: the modulated CAM (Table 5)
    relu: bool = True  # ReLU on the CAM logits before the product (MCTformer; the paper multiplies them as they are)
    orientation: Literal["gather", "literal"] = "gather"  # final[c, i] = sum_j p2p[i, j] mod[c, j] (MCTformer) or Mod x p2p
    modulation: ModulationParams = ModulationParams()
    flip: bool = True  # add the mirror view (stored when cams.flip)
    normalize: Literal["minmax", "max"] = "minmax"  # per class: (x - min) / (max - min) (MCTformer), or x / max


class MCTParams(MethodParams):
    model: MCTModelParams = MCTModelParams()
    export: MCTExportParams = MCTExportParams()
    refine: MCTRefineParams = MCTRefineParams()


@register_method
class MCTMethod(Method):
    name = "mct"
    Params = MCTParams
    refines = True
    backbones = VIT_BACKBONES

    def check(self, params: Params) -> None:
        super().check(params)
        refine = self.params.refine
        if not (refine.use_cam or refine.use_c2p):
            raise ParamsError(f"methods.{self.name}.refine: use_cam and use_c2p are both false: nothing to refine")
        if refine.p2p_layers != "all" and self.params.export.p2p == "sum":
            raise ParamsError(f"methods.{self.name}.refine.p2p_layers: choosing blocks needs "
                              f"methods.{self.name}.export.p2p: layers (the store would hold their sum only)")
        model = self.params.model
        if model.token_backbone and model.token_backbone not in CNN_BACKBONES:
            raise ParamsError(f"methods.{self.name}.model.token_backbone {model.token_backbone!r} is not one of: "
                              f"{', '.join(CNN_BACKBONES)} (or '' for the patch convolution)")
        if model.token_backbone and params.cls.pretrained:
            raise ParamsError(f"cls.pretrained {params.cls.pretrained!r}: DeiT weights do not fit hybrid tokens "
                              f"(methods.{self.name}.model.token_backbone {model.token_backbone!r}); give ''")
        export = self.params.export
        if export.p2p_source == "token_features" and not model.token_backbone:
            raise ParamsError(f"methods.{self.name}.export.p2p_source: token_features needs hybrid tokens "
                              f"(methods.{self.name}.model.token_backbone)")
        if export.p2p_source == "token_features" and export.p2p == "layers":
            raise ParamsError(f"methods.{self.name}.export.p2p: layers has no blocks to store with p2p_source "
                              f"token_features (one affinity per view); give sum")
        depth = model.depth or DEIT_DEPTH
        for key in ("c2p_layers", "p2p_layers"):
            if getattr(refine, key) != "all":
                chosen_blocks(getattr(refine, key), depth, f"methods.{self.name}.refine.{key}")

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> MCTformerV2:
        from wsss_core.models.backbones import Backbone
        from wsss_core.models.mctformer import build_mctformer

        model = self.params.model
        token_backbone = None
        if model.token_backbone:
            token_backbone = Backbone(model.token_backbone, model.token_backbone_stride,
                                      model.token_backbone_pretrained if pretrained else "",
                                      f"methods.{self.name}.model.token_backbone_pretrained")
        return build_mctformer(cls.backbone, num_classes, pretrained=cls.pretrained if pretrained else "",
                               head_kernel=model.head_kernel, final_norm=model.final_norm, drop_path=model.drop_path,
                               depth=model.depth, patch_size=model.patch_size, token_backbone=token_backbone,
                               token_backbone_lr_mult=model.token_backbone_lr_mult,
                               patch_pooling_decay=model.patch_pooling_decay)

    def training_loss(self, model: MCTformerV2, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        token_scores, patch_scores, _ = model(batch["images"])
        token = F.multilabel_soft_margin_loss(token_scores, batch["labels"])
        patch = F.multilabel_soft_margin_loss(patch_scores, batch["labels"])
        return self.params.model.token_loss_weight * token + patch, {"token": token.item(), "patch": patch.item()}

    def class_scores(self, model: MCTformerV2, images: torch.Tensor) -> torch.Tensor:
        """Return the class tokens' logits [B, K] (the patch CAM's when token_loss_weight is 0: untrained tokens)."""
        token_scores, patch_scores, _ = model(images)
        return token_scores if self.params.model.token_loss_weight else patch_scores

    def cam_maps(self, model: MCTformerV2, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": F.relu(model(images)[2])}

    def raw_maps(self, model: MCTformerV2, images: torch.Tensor) -> dict[str, RawMap]:
        cam_logits, attention = model.cam_and_attention(images)  # [B, C, h, w], [L, B, T, T]
        classes, grid = model.num_classes, tuple(cam_logits.shape[-2:])
        export = self.params.export
        p2p = attention[:, :, classes:, classes:]  # [L, B, N, N]
        if export.p2p_source == "token_features":
            p2p_map = RawMap(model.token_affinity(images, export.affinity_temperature), "tokens,tokens", grid)
        elif export.p2p == "layers":
            p2p_map = RawMap(p2p.transpose(0, 1), "layers,tokens,tokens", grid)
        else:
            p2p_map = RawMap(p2p.sum(0), "tokens,tokens", grid)
        return {"patch_cam": RawMap(cam_logits, "classes,height,width", grid),
                "c2p": RawMap(attention[:, :, :classes, classes:].transpose(0, 1), "layers,classes,tokens", grid),
                "p2p": p2p_map}

    def _fused_attention(self, raw: dict[str, np.ndarray], views: int, present: np.ndarray
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (c2p [V, k, N] of the present classes summed over refine.c2p_layers, p2p [V, N, N] summed over
        refine.p2p_layers) of the first `views` stored views; present: 0-based class indices [k]."""
        params: MCTRefineParams = self.params.refine
        c2p = sum_blocks(torch.from_numpy(raw["c2p"][:views, :, present]), params.c2p_layers,
                         f"methods.{self.name}.refine.c2p_layers")
        p2p = torch.from_numpy(raw["p2p"][:views])
        if p2p.ndim == 4:
            p2p = sum_blocks(p2p, params.p2p_layers, f"methods.{self.name}.refine.p2p_layers")
        elif params.p2p_layers != "all":
            raise ParamsError(f"methods.{self.name}.refine.p2p_layers: the store holds the sum over all blocks; "
                              f"choosing blocks needs methods.{self.name}.export.p2p: layers")
        return c2p, p2p

    def attention_statistics(self, store: CamStore, dataset: Dataset, ids: list[str]) -> dict:
        """Return, over the images with a mask (view 0 of the stored attention, p2p summed over the refine's
        blocks, c2p over its c2p_layers): the mean share of object / background queries' patch attention on
        object tokens (cams.attention.attention_on_objects; an affinity puts more from object queries), the
        object tokens' share of the grid, and the mean correlation of the present classes' class-to-patch maps
        on images with two or more classes (class specificity: low is specific)."""
        samples, correlations = [], []
        for image_id in ids:
            if not dataset.has_mask(image_id):
                continue
            keys = np.asarray(dataset.labels[image_id], dtype=np.int64)
            c2p, p2p = self._fused_attention(store.read_raw(image_id), 1, keys - 1)  # view 0
            _, grid = store.raw_layout(image_id, "p2p")
            samples.append((p2p[0].numpy(), object_tokens(dataset.read_mask(image_id), grid)))
            if len(keys) >= 2:
                correlations.append(class_map_correlation(c2p[0].numpy()))
        return {**object_attention_mass(samples),
                "class_map_correlation": float(np.mean(correlations)) if correlations else None,
                "multi_class_images": len(correlations)}

    def refine(self, cam: np.ndarray, keys: np.ndarray, raw: dict[str, np.ndarray]) -> np.ndarray:
        params: MCTRefineParams = self.params.refine
        if len(keys) == 0:
            return cam
        views = raw["c2p"].shape[0] if params.flip else 1
        present = keys - 1  # every step is per class: absent classes are never computed
        c2p, p2p = self._fused_attention(raw, views, present)
        if params.modulation.enabled:
            modulation = params.modulation
            c2p = semantic_modulation(c2p, p2p, ratio=modulation.ratio, alpha=modulation.alpha,
                                      exclude_self=modulation.exclude_self, rounding=modulation.rounding)
        _, final = joint_refine(torch.from_numpy(raw["patch_cam"][:views, present]), c2p, p2p, use_cam=params.use_cam,
                                use_c2p=params.use_c2p, use_p2p=params.use_p2p, orientation=params.orientation,
                                relu=params.relu)  # [V, k, h, w]
        maps = F.interpolate(final, cam.shape[1:], mode="bilinear", align_corners=False)
        total = maps[0] + maps[1].flip(-1) if views == 2 else maps[0]  # [k, H, W]: the mirror view flipped back
        if params.normalize == "minmax":
            low = total.flatten(1).amin(1)[:, None, None]
            return ((total - low) / (total.flatten(1).amax(1)[:, None, None] - low + 1e-8)).numpy()
        total = total.clamp(min=0)
        return (total / (total.flatten(1).amax(1)[:, None, None] + 1e-5)).numpy()
