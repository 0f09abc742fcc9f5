"""Multi-SA (Yaganapu & Kang, CVIU): multi-layered self-attention CAMs on any timm backbone.

The last k taps of the backbone each go through a self-attention block (`SelfAttention`), are
resized to the finest tap's size, concatenated, fused by a 1x1 conv and classified after global
average pooling; the CAMs are the classifier applied to the fused map, at the finest tap's stride
(8 with k = 3). The taps are the stage outputs at strides 8 and 16 (ResNet layer2 and layer3) and
the backbone's final features (ResNet layer4; for EfficientNet its 1x1 head conv after the last
stage, so that k = 0 is exactly the plain CAM network `CamNet` on any backbone).
No code was released with the paper; the ambiguities it leaves are constructor arguments at the
spec's recommended defaults (../shared/methods/multisa.md, section 7).

`tap_norm="bn_relu"` (not in the paper) puts a BatchNorm and a ReLU on each tap before its attention block.
The paper's ResNet taps are post-ReLU stage outputs of comparable scale; EfficientNet-Lite0's stride-8/16 taps
are linear-bottleneck outputs (signed, unactivated, 8.5x the head tap's energy), which then dominate the
stacked CAM. Normalised and activated, every tap channel has unit scale whatever the backbone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.models.backbones import Backbone
from wsss_core.models.catalog import MULTISA_MAX_LAYERS
from wsss_core.models.groups import ParamGroup

ATTENTION_CHUNK = 4096  # query rows per softmax block: bounds the [rows, N] attention in memory, exact result


class SelfAttention(nn.Module):
    """Multi-SA's non-local block (spec eqs. 1-5): V = beta * O + F with O[:, i] = sum_j A[i, j] U[:, j].

    Q, K and U are 1x1 convs (Q and K at channels // reduction, U at full width), A = softmax over the
    keys of Q^T K (times 1/sqrt(d) only with scale='sqrt_d'; the paper has none), computed in float32.
    beta is one learnable scalar, 0 at initialisation so that the block starts as the identity.
    """

    def __init__(self, channels: int, *, reduction: int = 1, scale: str = "none", bias: bool = False,
                 beta_init: float = 0.0):
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1, bias=bias)
        self.key = nn.Conv2d(channels, inner, 1, bias=bias)
        self.value = nn.Conv2d(channels, channels, 1, bias=bias)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))
        self.logit_scale = inner ** -0.5 if scale == "sqrt_d" else 1.0
        for conv in (self.query, self.key, self.value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def _projections(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return queries [B, N, d] and keys [B, d, N] in float32, values [B, N, C]."""
        queries = self.query(features).flatten(2).transpose(1, 2).float()
        return queries, self.key(features).flatten(2).float(), self.value(features).flatten(2).transpose(1, 2)

    def _softmax(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (queries @ keys * self.logit_scale).softmax(-1)  # [B, n, N], each row sums to 1

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """Return the attention A [B, N, N] (float32, rows sum to 1) of features [B, C, h, w], N = h * w."""
        queries, keys, _ = self._projections(features)
        return self._softmax(queries, keys)

    def attend(self, features: torch.Tensor) -> torch.Tensor:
        """Return O [B, C, h, w]: each pixel's attention-weighted mean of the values (in query chunks)."""
        queries, keys, values = self._projections(features)
        rows = [self._softmax(queries[:, start:start + ATTENTION_CHUNK], keys).to(values.dtype) @ values
                for start in range(0, queries.shape[1], ATTENTION_CHUNK)]  # each [B, n, C]
        return torch.cat(rows, 1).transpose(1, 2).reshape(features.shape)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return V = beta * O + F, the shape of features [B, C, h, w]."""
        return features + self.beta * self.attend(features)


class MultiSANet(nn.Module):
    """Multi-label classifier with Multi-SA's attended, stacked and fused taps; CAMs at the finest tap's stride.

    layers: k, the number of taps (the last k of: stride-8 stage, stride-16 stage, final features),
    each through a SelfAttention block; 0 gives the plain CAM network (final features, GAP, classifier).
    inline: feed each attended tap into the next backbone stage (through a forward hook) instead of
    attending side branches of an unchanged backbone (the spec's default).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, layers: int = 3, reduction: int = 1,
                 scale: str = "none", sa_bias: bool = False, beta_init: float = 0.0, inline: bool = False,
                 fuse_bias: bool = False, classifier_bias: bool = False, align_corners: bool = False,
                 bias_lr_mult: float = 2.0, tap_norm: str = "none"):
        super().__init__()
        if not 0 <= layers <= MULTISA_MAX_LAYERS:
            raise ValueError(f"layers must be in 0..{MULTISA_MAX_LAYERS}, got {layers}")
        if tap_norm not in ("none", "bn_relu") or (tap_norm != "none" and inline):
            raise ValueError(f"tap_norm must be 'none' or 'bn_relu' (and 'none' with inline), got {tap_norm!r}")
        self.backbone = backbone
        info = backbone.body.feature_info
        candidates = [(info[-3]["module"], info[-3]["num_chs"], info[-3]["reduction"]),
                      (info[-2]["module"], info[-2]["num_chs"], info[-2]["reduction"]),
                      (None, backbone.channels, backbone.output_stride)]  # None: the final features
        self.taps = candidates[MULTISA_MAX_LAYERS - layers:]  # (module name or None, channels, stride), finest first
        self.blocks = nn.ModuleList(SelfAttention(channels, reduction=reduction, scale=scale, bias=sa_bias,
                                                  beta_init=beta_init) for _, channels, _ in self.taps)
        self.inline, self.align_corners, self.bias_lr_mult = inline, align_corners, bias_lr_mult
        self.tap_norms = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
                                       for _, channels, _ in self.taps) if tap_norm == "bn_relu" else None
        self.channels = [channels for _, channels, _ in self.taps] or [backbone.channels]
        stacked = sum(self.channels)
        self.fuse = nn.Conv2d(stacked, stacked, 1, bias=fuse_bias) if layers else nn.Identity()
        if layers:
            nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
        self.classifier = nn.Conv2d(stacked, num_classes, 1, bias=classifier_bias)
        self.mean, self.std = backbone.mean, backbone.std
        self.cam_stride: int = self.taps[0][2] if layers else backbone.output_stride
        self._captured: dict[int, torch.Tensor] = {}
        for index, (module, _, _) in enumerate(self.taps):
            if module is not None:
                backbone.body.get_submodule(module).register_forward_hook(self._capture_hook(index))

    def _capture_hook(self, index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor):
            if self.inline:
                output = self.blocks[index](output)
            self._captured[index] = output
            return output
        return hook

    def attended_taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return V_1..V_k (finest first, each [B, c_l, h_l, w_l]); [final features] when k = 0."""
        self._captured = {}
        final = self.backbone(images)
        if not self.taps:
            return [final]
        taps = [self._captured.pop(index) for index in range(len(self.taps) - 1)] + [final]
        if self.tap_norms is not None:
            taps = [norm(tap) for norm, tap in zip(self.tap_norms, taps)]
        return [tap if self.inline and index < len(taps) - 1 else block(tap)
                for index, (tap, block) in enumerate(zip(taps, self.blocks))]

    def stacked(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Return Z [B, sum c_l, h_1, w_1]: V_1 as it is, then V_2..V_k resized bilinearly to its size."""
        size = taps[0].shape[-2:]
        return torch.cat([taps[0]] + [F.interpolate(tap, size=size, mode="bilinear", align_corners=self.align_corners)
                                      for tap in taps[1:]], dim=1)

    def fused(self, images: torch.Tensor) -> torch.Tensor:
        """Return the fused map Theta [B, sum c_l, h_1, w_1] at cam_stride (the paper's eq. 7, pixel by pixel)."""
        return self.fuse(self.stacked(self.attended_taps(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, K] = classifier(GAP(Theta)).

        The 1x1 fuse conv is linear, so it is applied to GAP(Z) rather than to every pixel of Z: the same
        logits (up to float rounding) for 1/(h_1 w_1) of the fuse conv's cost.
        """
        pooled = self.stacked(self.attended_taps(images)).mean(dim=(2, 3), keepdim=True)  # GAP(Z) [B, c*, 1, 1]
        return self.classifier(self.fuse(pooled)).flatten(1)

    def collapsed_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (W [K, c*, 1, 1], b [K] or None) with classifier(fuse(Z)) = W Z + b at every pixel."""
        weight, bias = self.classifier.weight, self.classifier.bias
        if self.taps:
            if self.fuse.bias is not None:
                bias = weight.flatten(1) @ self.fuse.bias + (bias if bias is not None else 0)
            weight = (weight.flatten(1) @ self.fuse.weight.flatten(1))[:, :, None, None]  # W_cls W_fuse
        return weight, bias

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """Return ReLU class activation maps [B, K, h_1, w_1] of the fused map, through the collapsed head
        (K instead of c* output channels per pixel; equal to classifier(Theta) up to float rounding)."""
        return F.relu(F.conv2d(self.stacked(self.attended_taps(images)), *self.collapsed_head()))

    def layer_cams(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (raw CAM [B, K, h_1, w_1], each tap's additive share of it [B, K, h_1, w_1], finest first).

        The shares are (W_cls W_fuse)[:, channels of tap l] applied to the resized V_l (spec 7.17) and sum
        to the raw CAM minus the fuse and classifier biases; none of them is ReLU'd.
        """
        stacked = self.stacked(self.attended_taps(images))
        weight, bias = self.collapsed_head()
        shares = [F.conv2d(tap, part) for part, tap in zip(weight.split(self.channels, 1), stacked.split(self.channels, 1))]
        return F.conv2d(stacked, weight, bias), shares

    def gates(self) -> list[float]:
        """Return the learned beta of each tap, finest first."""
        return [float(block.beta.detach()) for block in self.blocks]

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the pretrained backbone's weights (lr x1, weight decay) and biases (lr x bias_lr_mult, none),
        the new layers' weights (lr x new_layer_lr_mult, weight decay) and biases (x new x bias, none), and the
        beta gates (lr x new_layer_lr_mult, no weight decay): Puzzle-CAM's grouping, which the spec follows."""
        gates = [block.beta for block in self.blocks]
        gate_ids = {id(gate) for gate in gates}
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        split: dict[tuple[bool, bool], list[nn.Parameter]] = {(b, bias): [] for b in (True, False) for bias in (True, False)}
        for name, parameter in self.named_parameters():
            if id(parameter) not in gate_ids:
                split[(id(parameter) in backbone_ids, name.endswith("bias"))].append(parameter)
        groups = [ParamGroup("backbone", split[(True, False)]),
                  ParamGroup("backbone_bias", split[(True, True)], self.bias_lr_mult, weight_decay=False),
                  ParamGroup("new", split[(False, False)], new_layer_lr_mult),
                  ParamGroup("new_bias", split[(False, True)], new_layer_lr_mult * self.bias_lr_mult, False),
                  ParamGroup("gates", gates, new_layer_lr_mult, weight_decay=False)]
        return [group for group in groups if group.params]
