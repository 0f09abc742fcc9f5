"""Typed, validated params: one model per params.yaml section.

Nothing here reads files: stages load the YAML and pass the mapping to `parse_params`, which
turns any problem into a one-line `ParamsError` naming the key and what is allowed. Each
method's own section (`methods.<name>`) is validated by the model its method registers, which
the caller passes in; this module knows no method.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, Field, SerializeAsAny, ValidationError, model_validator

from wsss_core.data.files import DEFAULT_MAX_PARSE_BYTES, ReadLimits
from wsss_core.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_TEXT_BYTES
from wsss_core.data.sources import CocoParams, SyntheticParams, SyntheticSpec, TagsParams, VocParams
from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CNN_BACKBONES
from wsss_core.sections import (Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Scales, Seed,
                                Section)

Backbone = Literal[CNN_BACKBONES]


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


class DataParams(Section):
    name: Literal["synthetic", "voc", "tags", "coco"] = "synthetic"
    # The folder (or file) the raw data come from, relative to the repo root: the prepare stage depends on it,
    # so new photos, labels or masks there re-run it. Each preset sets it (voc, tags: their root).
    source: str = "conf/data/synthetic.yaml"
    seed: Seed = 0
    # Images with more pixels (width x height) are refused with one line (wsss_core.data.images).
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS
    # List, class and labels files larger than this many bytes are refused before reading (wsss_core.data.files).
    max_text_bytes: PositiveInt = DEFAULT_MAX_TEXT_BYTES
    # A JSON file (tags labels, COCO annotations) whose parse is estimated to take more bytes of memory (text and
    # Python objects, wsss_core.data.files.json_memory_estimate) is refused before parsing.
    max_parse_bytes: PositiveInt = DEFAULT_MAX_PARSE_BYTES
    # False: a data file or folder that is a link resolving outside the dataset root is refused, naming it.
    follow_links: bool = False
    synthetic: SyntheticParams = SyntheticParams()
    voc: VocParams = VocParams()
    tags: TagsParams = TagsParams()
    coco: CocoParams = CocoParams()

    def limits(self) -> ReadLimits:
        """Return the bounds every reader applies (the limits above)."""
        return ReadLimits(max_pixels=self.max_pixels, max_text_bytes=self.max_text_bytes,
                          max_parse_bytes=self.max_parse_bytes, follow_links=self.follow_links)

    def synthetic_spec(self) -> SyntheticSpec | None:
        """Return the synthetic set this section generates (its knobs and `seed`), or None for a set on disk."""
        return self.synthetic.with_seed(self.seed) if self.name == "synthetic" else None


class TrainRecipe(Section):
    """What every training stage shares: sizes, optimizer and learning-rate schedule.

    optimizer sgd (momentum, nesterov) or adamw; schedule poly ((1 - t)^poly_power), cosine (down to
    lr * min_lr_ratio) or step (x step_gamma at each epoch in step_milestones); warmup_epochs of
    linear warm-up from 0 precede any schedule; grad_clip_norm > 0 caps the gradient's global L2 norm.
    Networks scale lr per parameter group (new layers by new_layer_lr_mult) and say which groups take
    weight decay.
    """

    epochs: PositiveInt = 5
    batch_size: PositiveInt = 16
    crop_size: PositiveInt = 160
    resize_long: ResizeRange = [160, 256]
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    new_layer_lr_mult: PositiveFloat = 10.0
    weight_decay: NonNegativeFloat = 1e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: bool = False
    schedule: Literal["poly", "cosine", "step"] = "poly"
    poly_power: NonNegativeFloat = 0.9
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    step_milestones: list[PositiveInt] = []
    step_gamma: Fraction = 0.1
    warmup_epochs: NonNegativeInt = 0
    # Rescale each step's gradient (all parameters together) to at most this L2 norm; 0: no clipping (the
    # papers' recipes).
    grad_clip_norm: NonNegativeFloat = 0.0
    num_workers: NonNegativeInt = 0
    # IRN keeps the backbone's BatchNorm frozen (pretrained statistics); train it when starting from scratch.
    freeze_bn: bool = False
    # CUDA only: bfloat16 autocast (float16 + loss scaling where the GPU lacks bfloat16) and channels_last.
    amp: bool = True


class ClsParams(TrainRecipe):
    # The classifier's network: the active method checks it against the backbones it takes (`Method.backbones`,
    # names from wsss_core/models/catalog.py: timm CNNs, DeiTs, Conformers, VGG-16 for AGEN).
    backbone: str = "resnet18"
    # Local state-dict path, "efficientnet_lite0" (weights from the lite0 package) or "" (random init).
    pretrained: str = ""
    output_stride: Literal[8, 16, 32] = 16


class CamsParams(Section):
    scales: Scales = [1.0, 0.5, 1.5]  # IRN adds 2.0; dropped for the CPU default
    flip: bool = True
    batch_size: PositiveInt = 8
    num_workers: NonNegativeInt = 0  # DataLoader processes reading the images (0: the exporting process)
    # CAM seeds: a pixel is background where every CAM is at most this (IRN's cam_eval_thres).
    seed_bg_threshold: Fraction = 0.15
    sweep: ThresholdRange = [0.05, 0.95, 0.05]  # start, stop (inclusive), step


class CrfParams(Section):
    """Dense CRF (PSA's defaults)."""

    iterations: PositiveInt = 10
    gaussian_sxy: PositiveFloat = 3.0
    gaussian_compat: NonNegativeFloat = 3.0
    bilateral_sxy: PositiveFloat = 80.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: NonNegativeFloat = 10.0
    workers: NonNegativeInt = 0  # 0: one process per core


class DcrfParams(CrfParams):
    """The dcrf stage's CRF of the random-walk scores (and evaluate's test-time CRF: its kernels only)."""

    # scores: the walk's [background, classes] scores as a per-pixel distribution (PSA's crf_inference);
    # labels: the walk's argmax labels as unary with label_confidence (IRN's crf_inference_label).
    unary: Literal["scores", "labels"] = "scores"
    label_confidence: Fraction = 0.7


class AffinityParams(TrainRecipe):
    # psa: CRF-refined (1 - max CAM)^alpha at a low and a high alpha; irn: thresholds on CAMs.
    label_mode: Literal["psa", "irn"] = "psa"
    low_alpha: PositiveFloat = 4.0
    high_alpha: PositiveFloat = 32.0
    # irn only: confident foreground above irn_fg_threshold, confident background below irn_bg_threshold.
    irn_fg_threshold: Fraction = 0.30
    irn_bg_threshold: Fraction = 0.05
    # Each mode's own paper's CRF: PSA's crf_inference (bilateral sxy 80, srgb 13) on its score maps, IRN's
    # crf_inference_label (sxy 50, srgb 5) on its label maps, with irn_label_confidence as gt_prob.
    # The active mode's `workers` sizes the process pool.
    psa_label_crf: CrfParams = CrfParams()
    irn_label_crf: CrfParams = CrfParams(bilateral_sxy=50.0, bilateral_srgb=5.0)
    irn_label_confidence: Fraction = 0.7
    radius: PositiveInt = 5
    backbone: Backbone = "resnet18"
    pretrained: str = ""
    # Train only the new 1x1 layers on fixed pretrained features (PSA fine-tunes all).
    freeze_backbone: bool = False
    # true: PSA's backbone dilated to output stride 8; false: its stages at native strides 8/16/32, resized to
    # stride 8 (IRN's edge-branch layout; several times cheaper to train on a CPU).
    dilated: bool = True
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 8
    weight_decay: NonNegativeFloat = 5e-4


class RwParams(Section):
    beta: NonNegativeFloat = 8.0
    logt: NonNegativeInt = 8
    radius: PositiveInt = 5
    # The background score: alpha: (1 - max CAM)^bg_alpha, walked with the CAMs (PSA); constant: the constant
    # bg_constant, walked with them (MCTformer, 0.39); after_walk: the CAMs walk alone, are divided by their
    # maximum, and bg_constant is the background score after the walk (IRN's sem_seg_bg_thres, 0.25).
    bg_mode: Literal["alpha", "constant", "after_walk"] = "alpha"
    bg_alpha: PositiveFloat = 16.0
    bg_constant: Fraction = 0.39
    # all: every in-map pair within the radius; psa: PSA's released set, without the sources near the border.
    pair_set: Literal["all", "psa"] = "all"
    batch_size: PositiveInt = 4


class PseudoParams(Section):
    # cam: CAM seeds at cams.seed_bg_threshold; rw: random walk argmax; crf: dense CRF of the walk;
    # export: the method's own segmentation branch, stored by export_cams (AGEN's two-step variant).
    source: Literal["cam", "rw", "crf", "export"] = "crf"
    # Set 255 (ignored by train_seg) where the source disagrees with the other refinement (crf <-> rw).
    uncertain_to_void: bool = False


class RwsParams(Section):
    """RWS (refined weak slices) for the segmentation stage (seg/rws_training.py); defaults are the spec's
    recommendations (../shared/methods/rws.md, sections 3 and 8)."""

    enabled: bool = False
    layers: list[Annotated[int, Field(ge=1, le=4)]] = [1, 2, 3, 4]  # the stages blended (Table III), 1 = stride 4
    slice_size: PositiveInt = 128
    slice_stride: PositiveInt = 64
    max_slices_per_image: PositiveInt = 16
    select_rule: Literal["attention", "attention_and_iou"] = "attention"  # G3
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # T; 0: from the attention/IoU curve (Fig. 2)
    slope_bins: PositiveInt = 20
    slope_threshold: PositiveFloat = 0.02
    min_windows_per_bin: PositiveInt = 5
    min_class_fraction: Fraction = 0.01  # windows where a class covers less are not scored for it
    attention_region: Literal["class", "window"] = "class"  # G4: averaged over the class pixels or the window
    cam_pixels: Literal["argmax", "all"] = "argmax"  # G2: Seg-Grad-CAM's target pixels for class c
    epsilon: PositiveFloat = 1e-6  # eq. 5's omega > epsilon
    use_omega: bool = True  # False: every pixel of a weak slice (Table I middle column)
    use_lambda: bool = True  # False: lambda = lambda_constant (Table II)
    lambda_constant: Fraction = 0.5
    # A factor on eq. 7's blend strengths during retraining. 0 is RWS's switch-off control: every phase,
    # schedule, data order and the local network's training as with RWS, but the forward is never blended.
    beta: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    rounds: Annotated[int, Field(ge=1, le=4)] = 1
    stop_fraction: Fraction = 0.05  # a round whose weak-slice count fell by less than this ends RWS (3.8)
    # Shares of the seg.epochs budget: the global network trains for the rest, then per round the local
    # network on the weak slices and the global network again with blending (the same total as without RWS).
    local_iteration_fraction: Fraction = 0.15
    retrain_iteration_fraction: Fraction = 0.4
    show_images: NonNegativeInt = 4  # images whose heatmaps go to rws/ for `wsss rws show`

    @model_validator(mode="after")
    def _budget_fits(self) -> "RwsParams":
        if self.rounds * (self.local_iteration_fraction + self.retrain_iteration_fraction) >= 1:
            raise ValueError(f"seg.rws: rounds x (local_iteration_fraction + retrain_iteration_fraction) = "
                             f"{self.rounds * (self.local_iteration_fraction + self.retrain_iteration_fraction):g}"
                             f" leaves no budget for the global network (must be < 1)")
        if len(set(self.layers)) < len(self.layers):
            raise ValueError(f"seg.rws.layers {self.layers} names a stage twice")
        return self


class SegParams(TrainRecipe):
    # deeplabv3plus: our DeepLabV3+ over the timm `backbone`; deeplabv3_resnet50/101: torchvision's (OS 8).
    arch: Literal["deeplabv3plus", "deeplabv3_resnet50", "deeplabv3_resnet101"] = "deeplabv3plus"
    backbone: Backbone = "resnet18"
    # 32: no dilation at all (cheapest on a CPU; ASPP rates 3/6/9); 16 and 8: DeepLab's dilated backbones.
    output_stride: Literal[8, 16, 32] = 16
    # Width of DeepLabV3+'s ASPP and decoder (the paper's 256; the decoder's 3x3 convs at stride 4 dominate a CPU step).
    decoder_channels: PositiveInt = 256
    # Local state dict, our classifier checkpoint (models/cls.pt: same backbone), "efficientnet_lite0" or "".
    pretrained: str = "models/cls.pt"
    rws: RwsParams = RwsParams()
    batch_size: PositiveInt = 8
    crop_size: PositiveInt = 144
    resize_long: ResizeRange = [144, 240]
    # evaluate: multi-scale + flip averaging and a test-time dense CRF (settings from `crf`), as MCTformer.
    eval_scales: Scales = [1.0]
    eval_flip: bool = False
    eval_crf: bool = False
    # evaluate also scores RWS's test-time blending (spec 3.7's optional variant, not the paper's protocol) into
    # metrics/seg.json's `test_time_blend`; needs seg.rws.enabled (the local network and T come from rws/).
    eval_rws_blend: bool = False
    montage_images: NonNegativeInt = 8

    @model_validator(mode="after")
    def _blend_needs_rws(self) -> "SegParams":
        if self.eval_rws_blend and not self.rws.enabled:
            raise ValueError("seg.eval_rws_blend needs seg.rws.enabled (the local network comes from RWS's training)")
        return self


CodePath = Annotated[str, Field(pattern=r"^wsss_core/[A-Za-z0-9_/]+\.py$", max_length=200)]


class MethodCodeParams(Section):
    """The active method's own code files, beyond what every method shares. dvc.yaml lists them as deps of the
    stages that build or run the classifier (train_cls, export_cams, refine, evaluate), so that editing another
    method's files re-runs none of them; each conf/method/<name>.yaml sets its own, and tests/test_wiring.py
    checks them against what the method's module imports. Nothing reads them at run time."""

    module: CodePath = "wsss_core/methods/cam.py"
    base_module: CodePath = "wsss_core/methods/cam.py"  # the method module it extends (semod: mct's), or its own
    network: CodePath = "wsss_core/models/cam_net.py"
    base_network: CodePath = "wsss_core/models/cam_net.py"  # the network file it builds on, or its own


class DistParams(Section):
    """Processes per training or per-image stage (torchrun starts them when nproc > 1; 1 runs plain Python)."""

    nproc: PositiveInt = 1
    # auto: NCCL on CUDA, gloo on the CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class Params(Section):
    method: str = "cam"
    # The conf/ profile params.yaml was composed with (cpu: sizes for a 2-core machine; paper: the papers').
    profile: str = "cpu"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Seed = 0
    dist: DistParams = DistParams()
    data: DataParams = DataParams()
    cls: ClsParams = ClsParams()
    # Each method's own section {model: {...}, refine: {...}}, validated by its registered model.
    methods: dict[str, SerializeAsAny[Section]] = {}
    method_code: MethodCodeParams = MethodCodeParams()
    cams: CamsParams = CamsParams()
    affinity: AffinityParams = AffinityParams()
    rw: RwParams = RwParams()
    crf: DcrfParams = DcrfParams()
    pseudo: PseudoParams = PseudoParams()
    seg: SegParams = SegParams()

    def method_section(self) -> Section:
        """Return the active method's validated section (methods.<method>)."""
        return self.methods[self.method]


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


def _validate(model: type[BaseModel], mapping: Any, source: str, prefix: tuple = ()) -> BaseModel:
    """Return model.model_validate(mapping); the first problem becomes a one-line ParamsError."""
    try:
        return model.model_validate(mapping)
    except ValidationError as err:
        first = err.errors()[0]
        location = first["loc"]
        key = _dotted(prefix + tuple(location)) or "method"
        kind = first["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, location)
            raise ParamsError(f"{source}: unknown key {key} (allowed: {', '.join(allowed)})") from None
        if kind == "value_error":
            message = first["msg"].removeprefix("Value error, ")
            raise ParamsError(f"{source}: {message if message.startswith(key) else f'{key}: {message}'}") from None
        given = first.get("input")
        hint = " (YAML read it as text: write a plain number, e.g. 0.001 or 1.0e-3)" if _numeric_text(given) else ""
        raise ParamsError(f"{source}: {key}: {first['msg']}, got {given!r}{hint}") from None


def parse_params(mapping: Any, method_params: Mapping[str, type[Section]], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError with one line naming the first bad key.

    method_params maps every registered method name to the model of its `methods.<name>` section;
    `method` must be one of them, and every section under `methods` is validated by its model
    (missing sections take their defaults), so a typo in an inactive method's section fails too.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    sections = mapping.get("methods", {})
    if not isinstance(sections, dict):
        raise ParamsError(f"{source}: methods: expected a mapping of method sections, got {sections!r}")
    params = _validate(Params, {**mapping, "methods": {}}, source)
    if params.method not in method_params:
        raise ParamsError(f"{source}: method {params.method!r} is not one of: {', '.join(method_params)}")
    unknown = sorted(set(sections) - set(method_params))
    if unknown:
        raise ParamsError(f"{source}: unknown key methods.{unknown[0]} (registered methods: {', '.join(method_params)})")
    validated = {name: _validate(model, sections.get(name) or {}, source, ("methods", name))
                 for name, model in method_params.items()}
    return params.model_copy(update={"methods": validated})


def _numeric_text(value: Any) -> bool:
    """Return True for a string that reads as a number (a quoted or YAML-1.1 '1e-3' value)."""
    try:
        return isinstance(value, str) and bool(float(value) == float(value))
    except ValueError:
        return False
