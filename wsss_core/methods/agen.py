"""`agen`: AGEN (Zhang et al., Chinese Journal of Electronics 2023), classification and segmentation trained
jointly in one step from image-level labels.

The network is `models.agen.AGENNet`. Each training step (spec section 3) draws seeds online from every
class map (branch A's Z^top for branch B, each AGM's CoAM-enhanced map for its own segmentation head),
with the threshold rule of `cams/seeds.py`, and sums
  - a multi-label BCE (summed over classes, batch mean) per class map (Eqs. 10-11),
  - DSRG's balanced seeding loss per segmentation head (Eqs. 12-13),
  - SEC's constrain-to-boundary loss on branch B: KL(R || S^B) with R the dense CRF of S^B at the output
    stride, run per image over a process pool with no gradient (Eq. 14).
In the staged DAG the classifier stage trains it; export stores branch A's CAMs (`cam`) and, through
`segmenter`, branch B's probabilities (`seg`); `pseudo.source: export` makes branch B's argmax the pseudo
masks (the paper's two-step variant) and evaluate scores branch B itself as the one-step result.
Spec: ../shared/methods/agen.md; no code was released.
"""
from __future__ import annotations

import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from wsss_core.cams.seeds import (CAM_NORMALISATIONS, SEED_MODES, images_missing_a_class, seed_probabilities,
                                  threshold_seeds)
from wsss_core.config import ClsParams, CrfParams, NonNegativeFloat, NonNegativeInt, Params, PositiveFloat, \
    PositiveInt
from wsss_core.data.palette import VOID
from wsss_core.errors import ParamsError
from wsss_core.methods.base import Method, MethodParams, ModelParams, register_method
from wsss_core.models.catalog import AGEN_CLS_BACKBONES, AGEN_SEG_BACKBONES, AGEN_STAGE1_STRIDE, AGM_STAGES, \
    NEW_LAYER_INITS
from wsss_core.models.groups import ParamGroup, TrainingPhase
from wsss_core.pool import WorkerPool

if TYPE_CHECKING:
    from wsss_core.models.agen import AGENNet

Stage = Literal[AGM_STAGES]
SEED_ONSET_SHARE = 0.5  # a step has seeds when at most this share of its images lacks a labelled class's seeds
# The seed onset: the first of SEED_ONSET_STEPS consecutive steps with seeds. One step is not enough: the maps of a
# fresh branch A are positive at step 1 and die within the next few steps (docs/methods/agen.md).
SEED_ONSET_STEPS = 5


class BoundaryCrfParams(CrfParams):
    """The CRF of the boundary loss (spec section 4: SEC/DSRG's settings, which are CrfParams' defaults, at the
    output stride). `workers`: processes for a step's CRFs (0: one per core, 1: the training process), a speed
    knob that changes no number, but it sits in the model section, so changing it re-runs train_cls."""

    scale_factor: PositiveFloat = 12.0  # the kernels' xy widths are divided by it (the image is that much smaller)
    min_prob: Annotated[float, Field(gt=0.0, lt=0.01)] = 1e-4  # S and R are clipped to it and renormalised

    def at_output_stride(self) -> CrfParams:
        """Return these kernels as the shared CRF takes them, xy widths (px) divided by scale_factor."""
        return CrfParams(**{**self.model_dump(include=set(CrfParams.model_fields)),
                            "gaussian_sxy": self.gaussian_sxy / self.scale_factor,
                            "bilateral_sxy": self.bilateral_sxy / self.scale_factor})


class AGENModelParams(ModelParams):
    """AGEN's network and losses; each default is the paper's or, where it is silent, the spec's (section 7)."""

    seg_backbone: Literal[AGEN_SEG_BACKBONES] = "resnet38d"  # branch B (branch A: cls.backbone)
    seg_pretrained: str = ""  # branch B's weights: a PSA ResNet-38d file, "efficientnet_lite0" or "" (random)
    width: PositiveFloat = 1.0  # channel multiplier of VGG-16 / ResNet-38d (1: the paper's; tests use less)
    shared_stem: Literal["conv1_conv2", "conv1"] = "conv1_conv2"  # G1: the stages both branches share
    agm_stages: list[Stage] = [3, 4, 5]  # the paper's ablation switches (Table 2): [] is the baseline
    coam_stages: list[Stage] = [3, 4, 5]  # Table 3: a subset of agm_stages, chained top-down
    coam_impl: Literal["sdpa", "explicit"] = "sdpa"
    cls_head_channels: PositiveInt = 1024  # branch A's two 3x3 convs
    agm_cls_channels: PositiveInt = 256
    agm_seg_channels: PositiveInt = 512
    seg_head_channels: PositiveInt = 512  # branch B's head: RRM's two 3x3 convs at dilation seg_head_dilation
    seg_head_dilation: PositiveInt = 12
    agm_lr_mult: PositiveFloat = 10.0  # the AGMs' lr over cls.lr (paper: 0.01 vs 0.001)
    # Branch A's own layers (its stages after the shared stem, its head, its AGMs) at their lr x this (1: the
    # paper's). A schedule deviation for short CPU budgets (docs/methods/agen.md): with Eq. 3 branch B gets seeds
    # only once branch A's class maps turn positive, which on a few hundred steps comes too late.
    branch_a_lr_mult: PositiveFloat = 1.0
    # The new convolutions' init (the paper is silent): N(0, 0.01) as DeepLab and DSRG, RRM's Xavier-uniform,
    # whose unnormalised 3x3 stacks start the class maps at |Z| ~ 50 and diverged on Lite0 features here, or
    # kaiming (He-normal hidden convolutions, N(0, 0.01) outputs).
    new_layer_init: Literal[NEW_LAYER_INITS] = "normal"
    alpha: PositiveFloat = 8.0  # background exponent (Eq. 4)
    delta_top: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3  # seed threshold of Z^top (supervising S^B)
    delta_agm5: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3
    delta_agm4: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.4
    delta_agm3: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.4
    seed_mode: Literal[SEED_MODES] = "value"  # G2
    # The background channel's rule (None: seed_mode, as the spec's G2 asks). A deviation: with range_top and
    # alpha 8 a background seed needs max_k P_k < 0.044, while 'value' takes every pixel below 0.14, all of them
    # background in the measured runs (docs/methods/agen.md).
    background_seed_mode: Literal[SEED_MODES] | None = None
    restrict_to_labels: bool = True  # G3: CAMs of classes the image lacks are zeroed
    # An image one of whose labelled classes gets no seed: 'background' keeps the spec's rule (every pixel below
    # the thresholds, the unseen object's included, is a background seed); 'ignore' leaves the whole image out
    # of that head's seeding loss (a deviation: early CAMs that are 0 everywhere seed entire images as background).
    unseeded_images: Literal["background", "ignore"] = "background"
    # How a class map becomes seed probabilities: relu_max (the paper's Eq. 3: ReLU, divided by the maximum) or
    # min_max (a deviation: (Z - min) / (max - min), so each labelled class keeps a peak while its map is still
    # negative everywhere, as the summed BCE makes it in the first steps; docs/methods/agen.md).
    cam_normalisation: Literal[CAM_NORMALISATIONS] = "relu_max"
    # G7: seeds and S at the crop size, or at each map's own grid (the CAM resized there, not the seeds subsampled)
    seed_resolution: Literal["input", "feature"] = "input"
    cls_weight: NonNegativeFloat = 1.0
    seg_weight: NonNegativeFloat = 1.0
    boundary_weight: NonNegativeFloat = 1.0  # 0 skips the CRF
    # Training steps with the classification losses alone before the seeding and boundary losses join (0: the
    # paper's, every loss from the first step; docs/methods/agen.md has what 36 did on the CPU budget).
    seg_warmup_steps: NonNegativeInt = 0
    # Also hold the seeding and boundary losses back until the seed onset is confirmed (learned.seed_onset_step: the
    # first of SEED_ONSET_STEPS consecutive steps whose batches have branch A's seeds), a warm-up sized by the run
    # itself (a deviation; one process only).
    seg_warmup_until_onset: bool = False
    # Epochs that train the classification losses alone (branch A, the AGMs' classification heads and the CoAM
    # gains; branch B untouched) before the joint training, on an optimiser and a schedule cycle of their own at
    # warm_start_lr (None: cls.lr; cls's optimizer, schedule and multipliers). 0: the paper's joint training from
    # the ImageNet weights. A deviation standing in for branch A initialised from a trained classifier: with Eq. 3
    # branch B gets class seeds only once branch A's maps fire (docs/methods/agen.md).
    warm_start_epochs: NonNegativeInt = 0
    warm_start_lr: PositiveFloat | None = None
    crf: BoundaryCrfParams = BoundaryCrfParams()


class AGENParams(MethodParams):
    model: AGENModelParams = AGENModelParams()


def _head_name(key: str | int) -> str:
    """Return the name a class map's parts are logged under: 'top' or 'agmN'."""
    return key if key == "top" else f"agm{key}"


def padding_mask(images: torch.Tensor) -> torch.Tensor:
    """Return bool [B, H, W], False where the crop was padded: TrainAugment pads the normalised image with 0
    in all three channels, which no photo pixel normalises to (the means are not multiples of 1/255)."""
    return images.ne(0).any(1)


class _SegmentationBranch(nn.Module):
    """Branch B as a segmenter: images [B, 3, H, W] -> logits [B, K+1, H/8, W/8]."""

    def __init__(self, model: AGENNet):
        super().__init__()
        self.model, self.mean, self.std = model, model.mean, model.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return branch B's logits [B, K+1, H/8, W/8]."""
        return self.model.segment(images)


@register_method
class AGENMethod(Method):
    name = "agen"
    Params = AGENParams
    has_segmenter = True
    backbones = AGEN_CLS_BACKBONES

    def __init__(self, params: AGENParams | None = None):
        super().__init__(params)
        self._crf_pool = WorkerPool(self.params.model.crf.workers)
        self._steps_trained = 0  # training steps so far, the warm start's included (the seed onset counts them)
        self._seed_onset: int | None = None  # the first of SEED_ONSET_STEPS consecutive steps with branch A's seeds
        self._seeded_streak = 0  # consecutive steps with seeds so far
        self._warm_start_steps = 0  # warm_start_loss calls so far (seg_warmup_steps counts the joint steps after them)
        weakref.finalize(self, self._crf_pool.close)

    def check(self, params: Params) -> None:
        super().check(params)
        model = self.params.model
        if len(set(model.agm_stages)) < len(model.agm_stages) or len(set(model.coam_stages)) < len(model.coam_stages):
            raise ParamsError("methods.agen.model.agm_stages / coam_stages: a stage is named twice")
        if model.seg_warmup_until_onset and params.dist.nproc > 1:
            raise ParamsError("methods.agen.model.seg_warmup_until_onset: each process would see its own onset; "
                              "set dist.nproc to 1")
        if not set(model.coam_stages) <= set(model.agm_stages):
            raise ParamsError(f"methods.agen.model.coam_stages {model.coam_stages}: a CoAM needs the AGM of its "
                              f"stage (agm_stages {model.agm_stages})")
        if model.shared_stem == "conv1" and AGEN_STAGE1_STRIDE[params.cls.backbone] != AGEN_STAGE1_STRIDE[model.seg_backbone]:
            raise ParamsError(f"methods.agen.model.shared_stem conv1: cls.backbone {params.cls.backbone} and "
                              f"seg_backbone {model.seg_backbone} end stage 1 at different strides (use conv1_conv2)")

    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> AGENNet:
        from wsss_core.models.agen import AGENNet

        model = self.params.model
        return AGENNet(num_classes, cls_backbone=cls.backbone, seg_backbone=model.seg_backbone,
                       cls_pretrained=cls.pretrained if pretrained else "",
                       seg_pretrained=model.seg_pretrained if pretrained else "", width=model.width,
                       shared_stem=model.shared_stem, agm_stages=tuple(model.agm_stages),
                       coam_stages=tuple(model.coam_stages), coam_impl=model.coam_impl,
                       cls_head_channels=model.cls_head_channels, agm_cls_channels=model.agm_cls_channels,
                       agm_seg_channels=model.agm_seg_channels, seg_head_channels=model.seg_head_channels,
                       seg_head_dilation=model.seg_head_dilation, agm_lr_mult=model.agm_lr_mult,
                       new_layer_init=model.new_layer_init, branch_a_lr_mult=model.branch_a_lr_mult)

    def _threshold(self, key: str | int) -> float:
        """Return the seed threshold delta of a class map ('top' or an AGM stage)."""
        model = self.params.model
        return model.delta_top if key == "top" else getattr(model, f"delta_agm{key}")

    def _classification_parts(self, class_maps: dict[str | int, torch.Tensor],
                              labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {'cls_top' / 'cls_agmN': the multi-label BCE of GAP(map), summed over classes, batch mean}."""
        return {f"cls_{_head_name(key)}": F.binary_cross_entropy_with_logits(
            class_map.mean((2, 3)).float(), labels, reduction="sum") / len(labels)
            for key, class_map in class_maps.items()}

    def _seeds(self, key: str | int, class_map: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               size: tuple[int, int], with_grad: bool) -> tuple[torch.Tensor, float]:
        """Return (seed labels [B, *size] from one class map, the share of images with a labelled class left
        unseeded); Z^top's share also advances the seed onset (learned_values)."""
        settings = self.params.model
        mask = valid if size == tuple(valid.shape[-2:]) else (
            F.interpolate(valid[:, None].float(), size, mode="nearest")[:, 0].bool())
        with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad):
            probabilities = seed_probabilities(class_map, labels, size, alpha=settings.alpha,
                                               restrict_to_labels=settings.restrict_to_labels, valid=mask,
                                               normalisation=settings.cam_normalisation)
        seeds = threshold_seeds(probabilities, mask, self._threshold(key), settings.seed_mode,
                                settings.background_seed_mode)
        unseeded = images_missing_a_class(seeds, labels)
        share = unseeded.float().mean().item()
        if key == "top" and self._seed_onset is None:
            self._seeded_streak = self._seeded_streak + 1 if share <= SEED_ONSET_SHARE else 0
            if self._seeded_streak == SEED_ONSET_STEPS:
                self._seed_onset = self._steps_trained - SEED_ONSET_STEPS + 1
        if settings.unseeded_images == "ignore":
            seeds = seeds.masked_fill(unseeded[:, None, None], VOID)
        return seeds, share

    def training_loss(self, model: AGENNet, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (L_cls + L_seg + L_bnd weighted, parts): cls_*, seed_* per head ('top' and agmN), boundary,
        crf_ms (the step's CRF wall time) and unseeded_* per head (the share of the images in which a labelled
        class got no seed pixel: under the paper's rule all their seeds are background). During the first
        seg_warmup_steps calls (and, with seg_warmup_until_onset, until the seed onset is confirmed) the seeding and
        boundary parts are 0 and not computed; the seeds are still drawn (without gradient) for unseeded_* and the
        seed onset (learned_values)."""
        from wsss_core.cams.seed_losses import balanced_seed_loss, boundary_loss  # the CRF's pydensecrf, when training

        settings = self.params.model
        joint_steps = self._steps_trained - self._warm_start_steps
        warming_up = joint_steps < settings.seg_warmup_steps or (settings.seg_warmup_until_onset
                                                                  and self._seed_onset is None)
        self._steps_trained += 1
        images, labels = batch["images"], batch["labels"]
        outputs = model.outputs(images)
        valid = padding_mask(images)
        parts = self._classification_parts(outputs.class_maps, labels)
        unseeded_share: dict[str, float] = {}
        for key, class_map in outputs.class_maps.items():
            name = _head_name(key)
            logits = outputs.seg_logits[key]
            size = tuple(images.shape[-2:]) if settings.seed_resolution == "input" else tuple(logits.shape[-2:])
            seeds, unseeded_share[f"unseeded_{name}"] = self._seeds(key, class_map, labels, valid, size,
                                                                    not warming_up)
            if warming_up:
                parts[f"seed_{name}"] = torch.zeros((), device=images.device)
                continue
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size, mode="bilinear", align_corners=False)
            parts[f"seed_{name}"] = balanced_seed_loss(logits, seeds)
        loss = (settings.cls_weight * sum(v for k, v in parts.items() if k.startswith("cls_"))
                + settings.seg_weight * sum(v for k, v in parts.items() if k.startswith("seed_")))
        logged = {**{key: value.item() for key, value in parts.items()}, **unseeded_share}
        if settings.boundary_weight > 0 and warming_up:
            logged["crf_ms"], logged["boundary"] = 0.0, 0.0
        elif settings.boundary_weight > 0:
            started = time.perf_counter()
            boundary = boundary_loss(outputs.seg_logits["top"], batch["rgb"], settings.crf.at_output_stride(),
                                     settings.crf.min_prob, self._crf_pool.map)
            logged["crf_ms"] = 1000 * (time.perf_counter() - started)
            logged["boundary"] = boundary.item()
            loss = loss + settings.boundary_weight * boundary
        return loss, logged

    def warm_start_loss(self, model: AGENNet, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (L_cls weighted, parts): the classification losses alone, from the stem and branch A only
        (cls_* per class map), and unseeded_top, from Z^top's seeds drawn without gradient (the seed onset
        counts these steps)."""
        self._steps_trained += 1
        self._warm_start_steps += 1
        images, labels = batch["images"], batch["labels"]
        class_maps = model.classification_maps(images)
        parts = self._classification_parts(class_maps, labels)
        _, unseeded_top = self._seeds("top", class_maps["top"], labels, padding_mask(images),
                                      tuple(images.shape[-2:]), False)
        loss = self.params.model.cls_weight * sum(parts.values())
        return loss, {**{key: value.item() for key, value in parts.items()}, "unseeded_top": unseeded_top}

    def warm_start(self, model: AGENNet, cls: ClsParams) -> TrainingPhase | None:
        """Return the classification-only phase of methods.agen.model.warm_start_epochs epochs at warm_start_lr (or
        cls.lr), training the classification parameters in their groups at cls's multipliers; None when it is 0."""
        settings = self.params.model
        if not settings.warm_start_epochs:
            return None
        trained = model.classification_parameters()
        groups = [ParamGroup(group.name, kept, group.lr_mult, group.weight_decay)
                  for group in model.parameter_groups(cls.new_layer_lr_mult)
                  if (kept := [p for p in group.params if id(p) in trained])]
        recipe = cls.model_copy(update={"epochs": settings.warm_start_epochs,
                                        "lr": settings.warm_start_lr or cls.lr})
        return TrainingPhase("warm start", recipe, groups, partial(self.warm_start_loss, model))

    def learned_values(self, model: AGENNet) -> dict[str, float]:
        """Return the CoAM gains and, once it happened, the seed onset: the first training step (1-based) of
        SEED_ONSET_STEPS consecutive steps at each of which at most SEED_ONSET_SHARE of the batch's images had a
        labelled class without a seed of branch A (Z^top). Before it, the seeding loss trains branch B towards
        background; a warm-up should cover it."""
        onset = {} if self._seed_onset is None else {"seed_onset_step": float(self._seed_onset)}
        return {**{f"lambda_coam{stage}": gain for stage, gain in model.coam_gains().items()}, **onset}

    def cam_maps(self, model: AGENNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": F.relu(model.class_map(images))}

    def segmenter(self, model: AGENNet) -> nn.Module:
        return _SegmentationBranch(model)
