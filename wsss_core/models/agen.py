"""AGEN (Zhang et al., Chinese Journal of Electronics 2023): the attention guided enhancement network.

Two branches share the first backbone stages. Branch A (a classifier: VGG-16 as DeepLab-LargeFOV in
the paper) gives class-aware maps Z^top; branch B (a segmentation network: ResNet-38 in the paper)
gives the segmentation logits S^B. Attention guided modules AGM-3/4/5 put a small classifier (C) on
branch A's stage-n features and a small segmentation head (D) on branch B's; a context attention
module (CoAM) refines the lower AGM's class map with the one above, top-down. The seeds and losses that
tie them together live in `methods/agen.py`; this file holds the network only (spec sections 2.1-2.5).

Stages follow VGG's numbering: stage 1 ends at stride 1 (Lite0: 2), stage 2 at stride 2, stage 3 at 4, stages
4 and 5 at 8 (stage 5 dilated); `top` (branch B only) is what follows stage 5. Every branch backbone is cut into
these stages (`backbone_stages`), so AGEN runs on VGG-16, ResNet-38d or a timm EfficientNet-Lite0 (the
CPU profile: its packaged ImageNet weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import (AGEN_CLS_BACKBONES, AGEN_SEG_BACKBONES, AGEN_STAGE1_STRIDE, AGM_STAGES,
                                      NEW_LAYER_INITS)
from wsss_core.models.pretrained import (LITE0_PACKAGE_NAME, load_backbone_file, load_lite0_package_weights,
                                        read_state_dict)
from wsss_core.models.resnet38d import ResNet38d, load_resnet38d_weights
from wsss_core.models.groups import ParamGroup

SHARED_STEMS = {"conv1_conv2": 2, "conv1": 1}  # the number of stages both branches share
COAM_IMPLS = ("sdpa", "explicit")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAM_STRIDE = 8
LITE0_STAGE_CHANNELS = (32, 16, 24, 40, 320, 1280)


@dataclass
class Stages:
    """A backbone cut into [stage1, stage2, stage3, stage4, stage5, top] with each one's output channels."""

    modules: list[nn.Module]
    channels: list[int]
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the input normalisation its weights expect
    std: tuple[float, float, float] = IMAGENET_STD


def _scaled(channels: int, width: float) -> int:
    """Return channels x width, rounded, at least 1."""
    return max(1, round(channels * width))


VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))  # (convs, channels) of conv1..conv5


def vgg16_largefov_stages(width: float = 1.0, pretrained: str = "", param_key: str = "cls.pretrained") -> Stages:
    """Return VGG-16 cut into stages as DeepLab-LargeFOV: pools 1-3 3x3 stride 2 pad 1, pool4 stride 1,
    conv5 at dilation 2, no pool5 (output stride 8); `top` is empty.

    pretrained: a torchvision/timm VGG-16 state dict (`features.N.*`; the classifier's keys are skipped),
    mapped in order onto the 13 convolutions; width scales every channel count (tests) and needs no file.
    """
    stages, channels, in_channels = [], [], 3
    for block, (convs, out_channels) in enumerate(VGG16_BLOCKS):
        out_channels = _scaled(out_channels, width)
        dilation = 2 if block == 4 else 1
        layers: list[nn.Module] = []
        if block in (1, 2, 3):
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        elif block == 4:
            layers.append(nn.MaxPool2d(3, stride=1, padding=1))
        for _ in range(convs):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation), nn.ReLU(True)]
            in_channels = out_channels
        stages.append(nn.Sequential(*layers))
        channels.append(out_channels)
    if pretrained:
        _load_vgg16(stages, pretrained, param_key)
    return Stages(stages + [nn.Identity()], channels + [channels[-1]])


def _load_vgg16(stages: list[nn.Module], path: str, param_key: str) -> None:
    """Load torchvision's `features.N.{weight,bias}` convolutions, in order, into the stages' convolutions."""
    state = read_state_dict(path, param_key)
    convs = [module for stage in stages for module in stage if isinstance(module, nn.Conv2d)]
    indices = sorted({int(key.split(".")[1]) for key in state if key.startswith("features.")})
    if len(indices) != len(convs):
        raise ParamsError(f"{param_key}: {path} has {len(indices)} convolutions under features.*, VGG-16 has "
                          f"{len(convs)}")
    for index, conv in zip(indices, convs):
        weight, bias = state[f"features.{index}.weight"], state.get(f"features.{index}.bias")
        if weight.shape != conv.weight.shape or bias is None or bias.shape != conv.bias.shape:
            raise ParamsError(f"{param_key}: {path}: features.{index} has shape {list(weight.shape)}, VGG-16 "
                              f"needs {list(conv.weight.shape)} (with a bias)")
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)


def lite0_stages(pretrained: str = "", param_key: str = "cls.pretrained") -> Stages:
    """Return timm's tf_efficientnet_lite0 at output stride 8 cut into stages: stem (stride 2), blocks 0
    (stride 2), 1 (4), 2 (8), 3-6 (dilated) and top = conv_head + BN-ReLU6 (1280 channels).

    pretrained: "efficientnet_lite0" (the package's ImageNet weights), a local timm state dict, or "".
    """
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=CAM_STRIDE)
    if pretrained == LITE0_PACKAGE_NAME:
        load_lite0_package_weights(body)
    elif pretrained:
        load_backbone_file(body, pretrained, param_key)
    modules = [nn.Sequential(body.conv_stem, body.bn1), body.blocks[0], body.blocks[1], body.blocks[2],
               nn.Sequential(*body.blocks[3:]), nn.Sequential(body.conv_head, body.bn2)]
    return Stages(modules, list(LITE0_STAGE_CHANNELS), tuple(body.pretrained_cfg["mean"]),
                  tuple(body.pretrained_cfg["std"]))


def resnet38d_stages(width: float = 1.0, pretrained: str = "", param_key: str = "") -> Stages:
    """Return ResNet-38d (PSA's layout, `models/resnet38d.py`) cut into its stages, weights from a PSA file."""
    network = ResNet38d(width)
    if pretrained:
        load_resnet38d_weights(network, pretrained, param_key)
    return Stages(list(network.stages()), list(network.stage_channels))


def backbone_stages(name: str, *, width: float, pretrained: str, param_key: str) -> Stages:
    """Return the named branch backbone cut into stages (width: VGG-16 and ResNet-38d only); param_key names
    the weights' param in errors."""
    if name == "vgg16":
        return vgg16_largefov_stages(width, pretrained, param_key)
    if name == "resnet38d":
        return resnet38d_stages(width, pretrained, param_key)
    if name == "tf_efficientnet_lite0":
        return lite0_stages(pretrained, param_key)
    raise ValueError(f"AGEN backbone {name!r} is not one of: "
                     f"{', '.join(sorted(set(AGEN_CLS_BACKBONES + AGEN_SEG_BACKBONES)))}")


def coam_attention(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Return CoAM's attention W [B, N, N] (rows sum to 1): softmax_j(x_i . y_j) over the N = H*W positions
    of lower [B, K, H, W], upper bilinearly resized to H x W (the explicit form, spec Eqs. 6-7)."""
    upper = F.interpolate(upper, lower.shape[-2:], mode="bilinear", align_corners=False)
    queries, keys = lower.flatten(2).transpose(1, 2), upper.flatten(2)  # [B, N, K], [B, K, N]
    return torch.softmax(queries @ keys, dim=-1)


class ContextAttention(nn.Module):
    """CoAM (spec 2.5): out = x + lambda * W x with W = softmax(x^T y) over positions; no projections,
    lambda learnable from 0 (the identity at initialisation).

    impl 'sdpa' runs the fused scaled_dot_product_attention (scale 1, no N x N matrix where a fused
    kernel applies); 'explicit' builds W (coam_attention). They agree to float precision. It runs in float32
    under autocast: with scale 1 the dot products of raw class maps are large, and half precision loses them.
    """

    def __init__(self, impl: str = "sdpa"):
        super().__init__()
        if impl not in COAM_IMPLS:
            raise ValueError(f"CoAM impl {impl!r} is not one of: {', '.join(COAM_IMPLS)}")
        self.gain = nn.Parameter(torch.zeros(()))
        self.impl = impl

    def forward(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Return lower [B, K, H, W] enhanced by upper [B, K, h, w] (any h, w; bilinearly resized)."""
        if lower.shape[1] != upper.shape[1]:
            raise ValueError(f"CoAM: lower map has {lower.shape[1]} channels, upper map {upper.shape[1]}")
        with torch.autocast(lower.device.type, enabled=False):
            return self._enhance(lower.float(), upper.float())

    def _enhance(self, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        batch, classes, height, width = lower.shape
        values = lower.flatten(2).transpose(1, 2)  # [B, N, K]
        if self.impl == "explicit":
            context = coam_attention(lower, upper) @ values
        else:
            # Row-major [B, 1, N, K] operands: a strided last dimension sends the CPU to the unfused math path,
            # which builds the N x N matrix (2.4x slower for CoAM-3 on a 256 px crop, bench/agen_step.py).
            values = values.contiguous()[:, None]
            keys = F.interpolate(upper, (height, width), mode="bilinear", align_corners=False).flatten(2)
            context = F.scaled_dot_product_attention(values, keys.transpose(1, 2).contiguous()[:, None], values,
                                                     scale=1.0)[:, 0]
        return lower + self.gain * context.transpose(1, 2).reshape(batch, classes, height, width)


def _conv_relu(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation), nn.ReLU(True))


class AGMHeads(nn.Module):
    """The AGMs' sub-branches: per stage a private 3x3 conv adapting the channels, then a 3x3 conv and a 1x1
    conv shared by every stage. forward(n, features) -> [B, out_channels, h, w] of stage n."""

    def __init__(self, stage_channels: dict[int, int], width: int, out_channels: int):
        super().__init__()
        self.private = nn.ModuleDict({str(n): _conv_relu(c, width) for n, c in stage_channels.items()})
        self.shared = nn.Sequential(_conv_relu(width, width), nn.Conv2d(width, out_channels, 1))

    def forward(self, stage: int, features: torch.Tensor) -> torch.Tensor:
        """Return the head's map [B, out_channels, h, w] of stage-n features [B, C_n, h, w]."""
        return self.shared(self.private[str(stage)](features))


@dataclass
class AGENOutputs:
    """What one training forward gives (maps at their own strides; logits before any softmax).

    class_maps: {'top': Z^top, n: Z_n after CoAM} [B, K, h, w]; seg_logits: {'top': S^B, n: S^{AGM-n}}
    [B, K+1, h, w]; class_maps[key] supervises seg_logits[key] through its seeds.
    """

    class_maps: dict[str | int, torch.Tensor]
    seg_logits: dict[str | int, torch.Tensor]


class AGENNet(nn.Module):
    """Branch A (classifier) and branch B (segmenter) on a shared stem, AGM heads and the CoAM chain.

    shared_stem 'conv1_conv2' shares stages 1-2 (the spec's reading), 'conv1' stage 1 only (branch B then
    has its own stage 2). Where the stem's channels differ from what branch B's next stage takes (two
    different backbone families), a 1x1 conv adapts them (a deviation: the paper pairs VGG with ResNet-38,
    whose channels match).
    """

    def __init__(self, num_classes: int, *, cls_backbone: str, seg_backbone: str, cls_pretrained: str = "",
                 seg_pretrained: str = "", width: float = 1.0, shared_stem: str = "conv1_conv2",
                 agm_stages: tuple[int, ...] = AGM_STAGES, coam_stages: tuple[int, ...] = AGM_STAGES,
                 coam_impl: str = "sdpa", cls_head_channels: int = 1024, agm_cls_channels: int = 256,
                 agm_seg_channels: int = 512, seg_head_channels: int = 512, seg_head_dilation: int = 12,
                 agm_lr_mult: float = 10.0, new_layer_init: str = "normal", branch_a_lr_mult: float = 1.0):
        super().__init__()
        if shared_stem not in SHARED_STEMS:
            raise ValueError(f"shared_stem {shared_stem!r} is not one of: {', '.join(SHARED_STEMS)}")
        if not set(coam_stages) <= set(agm_stages):
            raise ValueError(f"CoAM stages {coam_stages} need their AGMs (agm_stages {agm_stages})")
        branch_a = backbone_stages(cls_backbone, width=width, pretrained=cls_pretrained, param_key="cls.pretrained")
        branch_b = backbone_stages(seg_backbone, width=width, pretrained=seg_pretrained,
                                   param_key="methods.agen.model.seg_pretrained")
        shared = SHARED_STEMS[shared_stem]
        if shared == 1 and AGEN_STAGE1_STRIDE[cls_backbone] != AGEN_STAGE1_STRIDE[seg_backbone]:
            raise ValueError(f"shared_stem conv1: {cls_backbone} and {seg_backbone} end stage 1 at different strides")
        self.stem = nn.Sequential(*branch_a.modules[:shared])
        self.cls_stages = nn.ModuleList(branch_a.modules[shared:5])  # up to stage 5
        self.seg_stages = nn.ModuleList(branch_b.modules[shared:5])
        stem_channels, seg_input = branch_a.channels[shared - 1], branch_b.channels[shared - 1]
        self.seg_adapter = nn.Identity() if stem_channels == seg_input else nn.Conv2d(stem_channels, seg_input, 1)
        self.seg_top = branch_b.modules[5]
        self.first_stage = shared + 1  # the stage number of cls_stages[0] and seg_stages[0]

        self.cls_head = nn.Sequential(_conv_relu(branch_a.channels[4], cls_head_channels),
                                      _conv_relu(cls_head_channels, cls_head_channels),
                                      nn.Conv2d(cls_head_channels, num_classes, 1))
        self.seg_head = nn.Sequential(_conv_relu(branch_b.channels[5], seg_head_channels, seg_head_dilation),
                                      nn.Conv2d(seg_head_channels, num_classes + 1, 3, padding=seg_head_dilation,
                                                dilation=seg_head_dilation))
        self.agm_stages = tuple(sorted(agm_stages, reverse=True))
        self.agm_cls = AGMHeads({n: branch_a.channels[n - 1] for n in self.agm_stages}, agm_cls_channels, num_classes)
        self.agm_seg = AGMHeads({n: branch_b.channels[n - 1] for n in self.agm_stages}, agm_seg_channels,
                                num_classes + 1)
        self.coam = nn.ModuleDict({str(n): ContextAttention(coam_impl) for n in coam_stages})
        for module in (self.cls_head, self.seg_head, self.agm_cls, self.agm_seg, self.seg_adapter):
            init_new_layers(module, new_layer_init)
        self.mean, self.std = branch_a.mean, branch_a.std  # branch B sees the same input
        self.cam_stride = CAM_STRIDE
        self.agm_lr_mult, self.branch_a_lr_mult = agm_lr_mult, branch_a_lr_mult
        self._pretrained = [self.stem, self.cls_stages, self.seg_stages, self.seg_top]

    def _branch_features(self, images: torch.Tensor, with_cls: bool = True) -> tuple[dict, dict, torch.Tensor]:
        """Return ({n: branch A's stage-n features}, {n: branch B's}, branch B's top features)."""
        stem = self.stem(images)
        cls_taps, seg_taps = {}, {}
        features = stem
        if with_cls:
            for number, stage in enumerate(self.cls_stages, self.first_stage):
                features = cls_taps[number] = stage(features)
        features = self.seg_adapter(stem)
        for number, stage in enumerate(self.seg_stages, self.first_stage):
            features = seg_taps[number] = stage(features)
        return cls_taps, seg_taps, self.seg_top(features)

    def class_map(self, images: torch.Tensor) -> torch.Tensor:
        """Return branch A's class-aware map Z^top [B, K, H/8, W/8] (stem and branch A only)."""
        features = self.stem(images)
        for stage in self.cls_stages:
            features = stage(features)
        return self.cls_head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return branch A's class logits [B, K] (GAP of Z^top)."""
        return self.class_map(images).mean((2, 3))

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Return branch B's segmentation logits [B, K+1, H/8, W/8] (stem, branch B and its head only)."""
        return self.seg_head(self._branch_features(images, with_cls=False)[2])

    def _class_maps(self, cls_taps: dict[int, torch.Tensor]) -> dict[str | int, torch.Tensor]:
        """Return {'top': Z^top, n: Z_n after CoAM} [B, K, h, w] from branch A's stage features; CoAM runs
        top-down, each stage n with the nearest AGM above it (enhanced if its own CoAM ran) or Z^top."""
        class_maps = {"top": self.cls_head(cls_taps[5])}
        upper = class_maps["top"]
        for number in self.agm_stages:  # 5, 4, 3
            class_map = self.agm_cls(number, cls_taps[number])
            if str(number) in self.coam:
                class_map = self.coam[str(number)](class_map, upper)
            class_maps[number] = upper = class_map
        return class_maps

    def classification_maps(self, images: torch.Tensor) -> dict[str | int, torch.Tensor]:
        """Return the class maps the classification losses read ({'top': Z^top, n: Z_n after CoAM}, [B, K, h, w]),
        from the stem and branch A only."""
        features, cls_taps = self.stem(images), {}
        for number, stage in enumerate(self.cls_stages, self.first_stage):
            features = cls_taps[number] = stage(features)
        return self._class_maps(cls_taps)

    def outputs(self, images: torch.Tensor) -> AGENOutputs:
        """Return every head's maps for the training losses (class maps as classification_maps gives them)."""
        cls_taps, seg_taps, seg_top = self._branch_features(images)
        seg_logits = {"top": self.seg_head(seg_top)}
        for number in self.agm_stages:
            seg_logits[number] = self.agm_seg(number, seg_taps[number])
        return AGENOutputs(self._class_maps(cls_taps), seg_logits)

    def classification_parameters(self) -> set[int]:
        """Return the ids of the parameters the classification losses train: the shared stem, branch A's stages
        and head, the AGMs' classification heads and the CoAM gains (branch B and every segmentation head excluded)."""
        modules = (self.stem, self.cls_stages, self.cls_head, self.agm_cls, self.coam)
        return {id(parameter) for module in modules for parameter in module.parameters()}

    def coam_gains(self) -> dict[int, float]:
        """Return {stage: lambda} of the CoAMs."""
        return {int(n): module.gain.item() for n, module in self.coam.items()}

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the pretrained backbones (lr x1, their BatchNorm is what cls.freeze_bn freezes), the AGM
        heads (x agm_lr_mult), the other new layers (x new_layer_lr_mult) and the CoAM gains (x
        new_layer_lr_mult, no weight decay). With branch_a_lr_mult other than 1, branch A's own layers (its
        stages after the shared stem, its head and its AGMs) form groups of their own at their rate x
        branch_a_lr_mult (`branch_a_backbone`, `branch_a_agm`, `branch_a_new`)."""
        branch_a = {"backbone": list(self.cls_stages.parameters()), "agm": list(self.agm_cls.parameters()),
                    "new": list(self.cls_head.parameters())} if self.branch_a_lr_mult != 1 else {}
        apart = {id(p) for params in branch_a.values() for p in params}
        pretrained = [p for module in self._pretrained for p in module.parameters() if id(p) not in apart]
        agm = [p for p in [*self.agm_cls.parameters(), *self.agm_seg.parameters()] if id(p) not in apart]
        gains = list(self.coam.parameters())
        known = {id(p) for p in pretrained + agm + gains} | apart
        new = [p for p in self.parameters() if id(p) not in known]
        groups = [ParamGroup("backbone", pretrained), ParamGroup("agm", agm, self.agm_lr_mult),
                  ParamGroup("new", new, new_layer_lr_mult), ParamGroup("gain", gains, new_layer_lr_mult, False)]
        rates = {"backbone": 1.0, "agm": self.agm_lr_mult, "new": new_layer_lr_mult}
        return groups + [ParamGroup(f"branch_a_{kind}", params, rates[kind] * self.branch_a_lr_mult)
                         for kind, params in branch_a.items()]


def init_new_layers(module: nn.Module, scheme: str) -> None:
    """Initialise the convolutions of a new module, biases 0: 'normal' N(0, 0.01) (DeepLab/DSRG's), 'xavier'
    Xavier-uniform (RRM's), 'kaiming' He-normal (fan in, ReLU gain) for each convolution a ReLU follows and
    N(0, 0.01) for the output convolutions."""
    if scheme not in NEW_LAYER_INITS:
        raise ValueError(f"new-layer init {scheme!r} is not one of: {', '.join(NEW_LAYER_INITS)}")
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            if scheme == "xavier":
                nn.init.xavier_uniform_(layer.weight)
            else:
                nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    if scheme == "kaiming":
        for block in module.modules():
            if isinstance(block, nn.Sequential):
                for conv, after in zip(block, list(block)[1:]):
                    if isinstance(conv, nn.Conv2d) and isinstance(after, nn.ReLU):
                        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
