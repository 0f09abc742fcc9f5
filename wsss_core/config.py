"""Typed, validated params: one model per params.yaml section.

Nothing here reads files: stages load the YAML and pass the mapping to `parse_params`, which
turns any problem into a one-line `ParamsError` naming the key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsss_core.data.images import DEFAULT_MAX_PIXELS
from wsss_core.errors import ParamsError

METHODS = ("cam",)  # grows as methods are registered in wsss_core/methods


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Scales = Annotated[list[PositiveFloat], Field(min_length=1)]


def _ordered_pair(pair: list[int]) -> list[int]:
    if pair[0] > pair[1]:
        raise ValueError(f"give [shortest, longest] with shortest <= longest, got {pair}")
    return pair


def _threshold_range(sweep: list[float]) -> list[float]:
    if len(sweep) != 3:
        raise ValueError(f"give [start, stop, step], got {len(sweep)} numbers")
    start, stop, step = sweep
    if not (0 < start <= stop < 1 and step > 0):
        raise ValueError(f"need 0 < start <= stop < 1 and step > 0, got {sweep}")
    return sweep


ResizeRange = Annotated[list[PositiveInt], Field(min_length=2, max_length=2), AfterValidator(_ordered_pair)]
ThresholdRange = Annotated[list[float], AfterValidator(_threshold_range)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticParams(Section):
    """Generator knobs, mirrored by wsss_core.data.synthetic.SyntheticSpec."""

    n_train: PositiveInt = 300
    n_val: PositiveInt = 60
    image_size: PositiveInt = 192
    num_classes: Annotated[int, Field(ge=5, le=8)] = 6
    max_objects: PositiveInt = 3
    max_distractors: NonNegativeInt = 2
    part_fraction: Fraction = 0.10
    void_width: NonNegativeInt = 2
    water_class: NonNegativeInt = 2
    water_bias: Fraction = 0.8
    # Labelled bodies move this fraction towards their part's colour: weak evidence beyond the part.
    body_tint: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25


class VocParams(Section):
    root: str = "../shared/data/voc12-mini"
    train_list: str = "ImageSets/Segmentation/train.txt"
    # Empty: carve `val_fraction` of the train ids (seeded) as val.
    val_list: str = ""
    val_fraction: Fraction = 0.2
    # Read train masks from SegmentationClassAug where present.
    use_aug: bool = False


class DataParams(Section):
    name: Literal["synthetic", "voc"] = "synthetic"
    seed: NonNegativeInt = 0
    # Images with more pixels (width x height) are refused with one line (wsss_core.data.images).
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    synthetic: SyntheticParams = SyntheticParams()
    voc: VocParams = VocParams()

    @model_validator(mode="after")
    def _voc_root_exists(self) -> "DataParams":
        if self.name == "voc" and not Path(self.voc.root).is_dir():
            raise ValueError(f"data.voc.root: directory not found: {self.voc.root}")
        return self


class ClsParams(Section):
    backbone: Literal["resnet18", "resnet50", "tf_efficientnet_lite0"] = "resnet18"
    # Local state-dict path, "efficientnet_lite0" (weights from the lite0 package) or "" (random init).
    pretrained: str = ""
    output_stride: Literal[8, 16, 32] = 16
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 16
    crop_size: PositiveInt = 160
    resize_long: ResizeRange = [160, 256]
    lr: PositiveFloat = 0.01
    new_layer_lr_mult: PositiveFloat = 10.0
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    poly_power: NonNegativeFloat = 0.9
    # IRN keeps BatchNorm frozen (pretrained statistics); train it when starting from scratch.
    freeze_bn: bool = False
    num_workers: NonNegativeInt = 0


class CamsParams(Section):
    scales: Scales = [1.0, 0.5, 1.5]  # IRN adds 2.0; dropped for the CPU default
    flip: bool = True
    batch_size: PositiveInt = 8
    bg_threshold: Fraction = 0.15
    sweep: ThresholdRange = [0.05, 0.60, 0.05]  # start, stop (inclusive), step


class RefineParams(Section):
    pass


class CrfParams(Section):
    """Dense CRF (PSA's defaults)."""

    iterations: PositiveInt = 10
    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: NonNegativeFloat = 3.0
    bilateral_sxy: PositiveFloat = 80.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: NonNegativeFloat = 10.0
    workers: NonNegativeInt = 0  # 0: one process per core


class AffinityParams(Section):
    # psa: CRF-refined (1 - max CAM)^alpha at a low and a high alpha; irn: thresholds on CAMs.
    label_mode: Literal["psa", "irn"] = "psa"
    low_alpha: PositiveFloat = 4.0
    high_alpha: PositiveFloat = 32.0
    fg_threshold: Fraction = 0.30
    bg_threshold: Fraction = 0.05
    label_crf: CrfParams = CrfParams()
    radius: PositiveInt = 5
    backbone: Literal["resnet18", "resnet50", "tf_efficientnet_lite0"] = "resnet18"
    pretrained: str = ""
    # Train only the new 1x1 layers on fixed pretrained features (PSA fine-tunes all; for CPUs).
    freeze_backbone: bool = False
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 8
    crop_size: PositiveInt = 160
    resize_long: ResizeRange = [160, 256]
    lr: PositiveFloat = 0.01
    new_layer_lr_mult: PositiveFloat = 10.0
    weight_decay: NonNegativeFloat = 5e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9


class RwParams(Section):
    beta: NonNegativeFloat = 8.0
    logt: Annotated[int, Field(ge=0)] = 8
    radius: PositiveInt = 5
    # alpha: background (1 - max CAM)^bg_alpha (PSA); threshold: constant bg_threshold (MCTformer).
    bg_mode: Literal["alpha", "threshold"] = "alpha"
    bg_alpha: PositiveFloat = 16.0
    bg_threshold: Fraction = 0.39
    batch_size: PositiveInt = 4


class PseudoParams(Section):
    source: Literal["cam", "rw", "crf"] = "crf"
    uncertain_to_void: bool = False


class SegParams(Section):
    # deeplabv3plus: our DeepLabV3+ over the timm `backbone`; deeplabv3_resnet50/101: torchvision's (OS 8).
    arch: Literal["deeplabv3plus", "deeplabv3_resnet50", "deeplabv3_resnet101"] = "deeplabv3plus"
    backbone: Literal["resnet18", "resnet50", "tf_efficientnet_lite0"] = "resnet18"
    output_stride: Literal[8, 16] = 16
    # Local state dict, our classifier checkpoint (models/cls.pt: same backbone), "efficientnet_lite0" or "".
    pretrained: str = "models/cls.pt"
    rws: bool = False  # RWS loss: not implemented yet; true is refused
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 8
    crop_size: PositiveInt = 144
    resize_long: ResizeRange = [144, 240]
    lr: PositiveFloat = 0.01
    new_layer_lr_mult: PositiveFloat = 10.0
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    poly_power: NonNegativeFloat = 0.9
    # evaluate: multi-scale + flip averaging and a test-time dense CRF (settings from `crf`), as MCTformer.
    eval_scales: Scales = [1.0]
    eval_flip: bool = False
    eval_crf: bool = False
    montage_images: Annotated[int, Field(ge=0)] = 8

    @model_validator(mode="after")
    def _rws_not_available(self) -> "SegParams":
        if self.rws:
            raise ValueError("seg.rws: the RWS loss is not implemented yet (set seg.rws: false)")
        return self


class Params(Section):
    method: str = "cam"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: NonNegativeInt = 0
    data: DataParams = DataParams()
    cls: ClsParams = ClsParams()
    cams: CamsParams = CamsParams()
    refine: RefineParams = RefineParams()
    affinity: AffinityParams = AffinityParams()
    rw: RwParams = RwParams()
    crf: CrfParams = CrfParams()
    pseudo: PseudoParams = PseudoParams()
    seg: SegParams = SegParams()

    @model_validator(mode="after")
    def _known_method(self) -> "Params":
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of: {', '.join(METHODS)}")
        return self


def _dotted(location: tuple) -> str:
    return ".".join(str(part) for part in location if part != "after")


def _allowed_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """Return the field names of the section at `location` (the parent of an unknown key)."""
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_params(mapping: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError with one line naming the first bad key."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    try:
        return Params.model_validate(mapping)
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(first["loc"]) or "method"
        kind = first["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(Params, first["loc"])
            raise ParamsError(f"{source}: unknown key {key} (allowed: {', '.join(allowed)})") from None
        if kind == "value_error":
            message = first["msg"].removeprefix("Value error, ")
            raise ParamsError(f"{source}: {message if message.startswith(key) else f'{key}: {message}'}") from None
        given = first.get("input")
        hint = " (YAML read it as text: write a plain number, e.g. 0.001 or 1.0e-3)" if _numeric_text(given) else ""
        raise ParamsError(f"{source}: {key}: {first['msg']}, got {given!r}{hint}") from None


def _numeric_text(value: Any) -> bool:
    """Return True for a string that reads as a number (a quoted or YAML-1.1 '1e-3' value)."""
    try:
        return isinstance(value, str) and bool(float(value) == float(value))
    except ValueError:
        return False
