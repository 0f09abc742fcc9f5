"""The method interface (v2) and its registry.

A method is one short subclass of `Method` in its own module, registered with `@register_method`;
the registry is the only list of method names. Methods compose the packages below them
(`models/`, `cams/`, `affinity/`), which take callables and arrays and never import `methods/`.

The hooks, in pipeline order:

- `build_classifier(cls, num_classes)`: the network `train_cls` trains. It exposes `mean`, `std`,
  `cam_stride` and `parameter_groups(new_layer_lr_mult) -> list[ParamGroup]`.
- `training_loss(model, batch) -> (loss, parts)`: batch = {'images', 'labels', 'rgb'}; parts go to dvclive.
- `warm_start(model, cls)`: an optional phase (`TrainingPhase`: recipe, parameter groups, loss) trained first.
- `class_scores(model, images)`: logits [B, K] for validation mAP.
- `learned_values(model)`: learned scalars (gates) for dvclive and `metrics/train_cls.json`.
- `cam_maps(model, images)`: class maps for the multi-scale + flip export; 'cam' is required.
- `raw_maps(model, images)`: maps stored as they are (token or stride resolution), at scale 1; what it
  stores may depend on the section's `export` knobs (deps of export_cams alone).
- `segmenter(model)`: a module giving segmentation logits [B, K+1, h, w], or None.
- `refine(cam, keys, raw)`: one image's refined CAMs with `self.params.refine`; the base class owns the loop.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.cams.hooks import CamHooks
from wsss_core.cams.store import CamStore, RawMap, transform_store
from wsss_core.checkpoint import load_checkpoint
from wsss_core.config import ClsParams, Params, Section
from wsss_core.data.dataset import Dataset
from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CNN_BACKBONES
from wsss_core.models.groups import TrainingPhase

CLASSIFIER_SHAPE_KEYS = ("backbone", "output_stride")  # cls params that shape every classifier


class ModelParams(Section):
    """Knobs that shape or train the network (deps of train_cls and export_cams); a method extends it."""


class ExportParams(Section):
    """Knobs of what export_cams stores for the method (deps of export_cams, not of train_cls); a method extends it."""


class RefineParams(Section):
    """Knobs of the method's CAM refinement only (deps of the refine stage alone); a method extends it."""


class MethodParams(Section):
    """The `methods.<name>` section: {model: {...}, export: {...}, refine: {...}}."""

    model: ModelParams = ModelParams()
    export: ExportParams = ExportParams()
    refine: RefineParams = RefineParams()


class Method:
    """Base class of every WSSS method; subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    refines: ClassVar[bool] = False  # False: the refine stage passes the CAM store through (hard link)
    has_segmenter: ClassVar[bool] = False  # True: segmenter() gives a segmentation branch (pseudo.source: export)
    backbones: ClassVar[tuple[str, ...]] = CNN_BACKBONES  # the cls.backbone values its classifier can be built on

    def __init__(self, params: MethodParams | None = None):
        self.params = params if params is not None else self.Params()

    def check(self, params: Params) -> None:
        """Raise a ParamsError for a params combination this method cannot run (one line)."""
        if params.cls.backbone not in self.backbones:
            raise ParamsError(f"cls.backbone {params.cls.backbone!r}: method {self.name!r} is built on one of: "
                              f"{', '.join(self.backbones)}")
        if params.pseudo.source == "export" and not self.has_segmenter:
            raise ParamsError(f"pseudo.source: export needs a method with a segmentation branch; "
                              f"method {self.name!r} has none (use cam, rw or crf)")

    def checkpoint_params(self, cls: ClsParams) -> dict:
        """Return the params a classifier checkpoint records: cls and this method's model section."""
        return {"cls": cls.model_dump(), "methods": {self.name: {"model": self.params.model.model_dump()}}}

    def load_classifier(self, path: Path, cls: ClsParams, num_classes: int) -> nn.Module:
        """Return the classifier saved at path by train_cls (eval mode, CPU), after checking that it was
        made by this method with the same shaping params (cls.backbone, cls.output_stride, methods.<name>.model)."""
        checkpoint = load_checkpoint(path, self.name, {
            "cls": {key: getattr(cls, key) for key in CLASSIFIER_SHAPE_KEYS},
            "methods": {self.name: {"model": self.params.model.model_dump()}}})
        model = self.build_classifier(cls, num_classes, pretrained=False)
        model.load_state_dict(checkpoint["model"])
        return model.eval()

    # train_cls
    def build_classifier(self, cls: ClsParams, num_classes: int, *, pretrained: bool = True) -> nn.Module:
        """Return the network train_cls trains (pretrained=False: skip loading cls.pretrained)."""
        raise NotImplementedError

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss, parts): multi-label soft margin on class_scores, no parts, by default."""
        return F.multilabel_soft_margin_loss(self.class_scores(model, batch["images"]), batch["labels"]), {}

    def warm_start(self, model: nn.Module, cls: ClsParams) -> TrainingPhase | None:
        """Return a phase train_cls runs before training_loss's (its own recipe, parameter groups and loss), or None."""
        return None

    def class_scores(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, K] for normalised images [B, 3, H, W]."""
        return model(images)

    def learned_values(self, model: nn.Module) -> dict[str, float]:
        """Return learned scalars worth watching (e.g. gates), logged each epoch and written after training."""
        return {}

    # export_cams
    def cam_maps(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return maps for CAM export, each [B, K, h, w] and non-negative; 'cam' is required."""
        raise NotImplementedError

    def raw_maps(self, model: nn.Module, images: torch.Tensor) -> dict[str, RawMap]:
        """Return maps to store as they are (scale 1; the flipped views come as more images). Default: none."""
        return {}

    def segmenter(self, model: nn.Module) -> nn.Module | None:
        """Return a module mapping images [B, 3, H, W] to segmentation logits [B, K+1, h, w], or None."""
        return None

    def cam_hooks(self, model: nn.Module) -> CamHooks:
        """Return what export_cams reads from `model`: this method's cam_maps, raw_maps, segmenter and
        class_scores bound to it, and its input normalisation."""
        return CamHooks(cam_maps=partial(self.cam_maps, model), mean=model.mean, std=model.std,
                        raw_maps=partial(self.raw_maps, model), segment=self.segmenter(model),
                        class_scores=partial(self.class_scores, model))

    def attention_statistics(self, store: CamStore, dataset: Dataset, ids: list[str]) -> dict:
        """Return statistics of the stored attention against ground truth that test the refinement's assumption
        (e.g. attention behaving like an affinity), written beside the refined CAMs' scores; none by default."""
        return {}

    # refine
    def refine(self, cam: np.ndarray, keys: np.ndarray, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Return one image's refined CAMs [k, H, W] in [0, 1] from cam [k, H, W], keys [k] and its raw maps, with
        this method's `params.refine` (validated once, by the section's model and `check`)."""
        raise NotImplementedError

    def refine_cams(self, source: Path, destination: Path, ids: list[str]) -> None:
        """Write the refined CAM store for ids (pass-through hard link for methods that do not refine)."""
        refine = self.refine if self.refines else None
        with CamStore(source) as store:
            transform_store(store, destination, ids, refine,
                            {"refined_by": self.name, "refine_params": self.params.refine.model_dump()})


def chosen_blocks(layers: list[int], count: int, path: str) -> list[int]:
    """Return the block indices 0..count-1 that `layers` names (negative: from the end), each once; a
    one-line ParamsError naming the param `path` otherwise."""
    outside = [layer for layer in layers if not -count <= layer < count]
    if outside:
        raise ParamsError(f"{path}: block {outside[0]} is not one of the {count} blocks (0..{count - 1}, or "
                          f"-{count}..-1 from the end)")
    blocks = [layer % count for layer in layers]
    if len(set(blocks)) < len(blocks):
        raise ParamsError(f"{path}: {layers} names a block twice")
    return blocks


def sum_blocks(stack: torch.Tensor, layers: list[int] | str, path: str) -> torch.Tensor:
    """Return stack [V, L, ...] summed over the chosen blocks [V, ...] ('all': every block)."""
    if layers == "all":
        return stack.sum(1)
    return stack[:, chosen_blocks(layers, stack.shape[1], path)].sum(1)


REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under its `name` (unique, non-empty)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_params() -> dict[str, type[MethodParams]]:
    """Return {name: params model} of every registered method (what config.parse_params validates with)."""
    return {name: cls.Params for name, cls in REGISTRY.items()}


def get_method(params: Params) -> Method:
    """Return the active method (params.method) built with its validated section, after its checks."""
    if params.method not in REGISTRY:
        raise ParamsError(f"method {params.method!r} is not one of: {', '.join(REGISTRY)}")
    method = REGISTRY[params.method](params.method_section())
    method.check(params)
    return method
