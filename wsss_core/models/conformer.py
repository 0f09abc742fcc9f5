"""Conformer (Peng et al., ICCV 2021) and its TransCAM variant (Li et al., JVCI 2023).

Two branches run side by side: a ResNet-style CNN branch (bottlenecks at strides 4, 8, 16) and a ViT branch
(a cls token plus one token per patch_size x patch_size patch, no positional embedding). From block 2 on, each
block couples them with feature coupling units: FCU-down (`squeeze_block`) pools the CNN block's mid feature onto
the token grid and adds it to the tokens before the transformer block; FCU-up (`expand_block`) maps the new
tokens back onto the CNN grid and adds them inside the second bottleneck (`fusion_block`). Spec:
../shared/methods/conformer.md, section 2.1.

Parameter names follow the official release (github.com/pengzhiliang/Conformer, `conformer.py`): `cls_token`,
`conv1`, `bn1`, `conv_1.*`, `trans_patch_conv`, `trans_1.*`, `conv_trans_{2..depth}.{cnn_block, fusion_block,
squeeze_block, expand_block, trans_block}.*`, `trans_norm`, `trans_cls_head`, `conv_cls_head`. The transformer
blocks are timm's `Block`, whose keys (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) are the
official ones, so an official `Conformer_small_patch16.pth` loads strictly into `conformer_s(1000)`, and into
`conformer_s(21, **TRANSCAM_SWITCHES)` once its two classification heads are left out; the attention of every
block is read with forward hooks (`models/hooks.py`).

Where TransCAM (github.com/liruiwen/TransCAM, `network/conformer.py`) deviates from Conformer:
* `last_fusion_stride=1`: the fusion bottleneck of the last block does not halve the CNN map (Conformer: 2), so
  the CNN output stays on the stride-16 token grid (14 x 14 at 224). The block keeps its 1x1 projection
  shortcut (`residual_conv`, `residual_bn`), now with stride 1, so the checkpoint's keys and shapes still fit.
* `cam_head_kernel=3`: `conv_cls_head` is a 3x3 conv (with bias) on the CNN map giving the CAM logits, and the
  conv logits are their global average (Conformer: average pooling, then the linear `conv_cls_head`).
* TransCAM's blocks return their attention probabilities; here timm's unchanged blocks are read with hooks.
Not carried over from the official code: `num_med_block` (0 in every released model, so no `med_block` keys),
dropout and attention dropout (0 in Conformer-S and TransCAM), and `num_classes=0` (no head).

Input sizes: height and width must be multiples of patch_size (16 for every size built here; multiples of 32
included), otherwise `forward` raises ValueError (the official code fails there with a shape mismatch between
the CNN map and the upsampled tokens). The CAM grid is (H/16, W/16) with `last_fusion_stride=1` and
(ceil(H/32), ceil(W/32)) with 2.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from wsss_core.models.hooks import AttentionRecorder

STEM_CHANNELS = 64  # stem width and the official `base_channel`: CNN stage s = 0, 1, 2 has 64 * channel_ratio * 2**s
EXPANSION = 4  # bottleneck: mid channels = output channels / 4
TRANSCAM_SWITCHES = {"last_fusion_stride": 1, "cam_head_kernel": 3}

BatchNorm = partial(nn.BatchNorm2d, eps=1e-6)  # every BatchNorm in the blocks (the stem's `bn1` keeps 1e-5)
LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # transformer blocks and FCU-down (the final `trans_norm` keeps 1e-5)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with a residual; the official `ConvBlock`, same parameter names.

    A projection shortcut (`residual_conv` 1x1 with the block's stride, `residual_bn`) replaces the identity when
    `projection` is set; it must be when channels or resolution change.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, projection: bool = False):
        super().__init__()
        mid_channels = out_channels // EXPANSION
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = BatchNorm(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = BatchNorm(out_channels)
        if projection:
            self.residual_conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.residual_bn = BatchNorm(out_channels)
        self.projection = projection

    def forward(self, x: torch.Tensor, injected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (output [B, C_out, H/s, W/s], mid feature [B, C_out/4, H/s, W/s] after the 3x3 conv's ReLU);
        `injected` [B, C_out/4, H, W] (the FCU-up output) is added to the input of the 3x3 conv."""
        reduced = F.relu(self.bn1(self.conv1(x)))
        mid = F.relu(self.bn2(self.conv2(reduced if injected is None else reduced + injected)))
        shortcut = self.residual_bn(self.residual_conv(x)) if self.projection else x
        return F.relu(self.bn3(self.conv3(mid)) + shortcut), mid


class CouplingDown(nn.Module):
    """FCU-down (official `FCUDown`): CNN mid feature -> patch-token embeddings, with the current cls token."""

    def __init__(self, in_channels: int, embed_dim: int, pool: int):
        super().__init__()
        self.conv_project = nn.Conv2d(in_channels, embed_dim, 1)
        self.pool = pool
        self.ln = LayerNorm(embed_dim)

    def forward(self, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """feature [B, C, h * pool, w * pool], tokens [B, 1 + h * w, D] -> [B, 1 + h * w, D]: the cls token of
        `tokens`, then the feature projected to D, average-pooled by `pool`, flattened row-major, LayerNorm, GELU."""
        patches = F.avg_pool2d(self.conv_project(feature), self.pool).flatten(2).transpose(1, 2)  # [B, h * w, D]
        return torch.cat([tokens[:, :1], F.gelu(self.ln(patches))], 1)


class CouplingUp(nn.Module):
    """FCU-up (official `FCUUp`): patch tokens -> a CNN feature map (the cls token is dropped)."""

    def __init__(self, embed_dim: int, out_channels: int, upsample: int):
        super().__init__()
        self.conv_project = nn.Conv2d(embed_dim, out_channels, 1)
        self.bn = BatchNorm(out_channels)
        self.upsample = upsample

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens [B, 1 + height * width, D] -> [B, C, height * upsample, width * upsample]: 1x1 conv, BN, ReLU,
        nearest upsampling."""
        grid = tokens[:, 1:].transpose(1, 2).unflatten(2, (height, width))  # [B, D, height, width]
        mapped = F.relu(self.bn(self.conv_project(grid)))
        return F.interpolate(mapped, size=(height * self.upsample, width * self.upsample), mode="nearest")


class ConvTransBlock(nn.Module):
    """One coupled block (official `ConvTransBlock`): CNN bottleneck, FCU-down, transformer block, FCU-up and the
    fusion bottleneck. `ratio` is the CNN map's size over the token grid's (4, 2, 1 for the stages at patch 16)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, ratio: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, fusion_stride: int | None):
        super().__init__()
        mid_channels = out_channels // EXPANSION
        resized = stride > 1 or in_channels != out_channels
        self.cnn_block = Bottleneck(in_channels, out_channels, stride=stride, projection=resized)
        self.fusion_block = Bottleneck(out_channels, out_channels, stride=fusion_stride or 1,
                                       projection=fusion_stride is not None)
        self.squeeze_block = CouplingDown(mid_channels, embed_dim, ratio)
        self.expand_block = CouplingUp(embed_dim, mid_channels, ratio)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                                 norm_layer=LayerNorm)
        self.ratio = ratio

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, H, W], tokens [B, 1 + N, D] -> (x [B, C_out, H', W'], tokens [B, 1 + N, D])."""
        x, mid = self.cnn_block(x)
        tokens = self.trans_block(self.squeeze_block(mid, tokens) + tokens)  # the cls token enters twice, as official
        height, width = mid.shape[-2:]
        injected = self.expand_block(tokens, height // self.ratio, width // self.ratio)  # [B, C_out/4, H, W]
        return self.fusion_block(x, injected)[0], tokens


class Conformer(nn.Module):
    """forward(images [B, 3, H, W]) -> (conv logits [B, C], transformer logits [B, C], CAM logits [B, C, h, w]).

    The conv logits are the spatial mean of the CAM logits. With `cam_head_kernel` None (Conformer) the head is
    the linear `conv_cls_head` applied at every position (the classic CAM), so the mean equals the official
    pool-then-linear logits; with a kernel k (TransCAM: 3) it is a k x k conv. The transformer logits are
    `trans_cls_head` on the normalised cls token. (h, w) = (H/16, W/16) for `last_fusion_stride` 1, (ceil(H/32),
    ceil(W/32)) for 2; H and W must be multiples of patch_size. See the module docstring for the names.
    """

    def __init__(self, *, num_classes: int, channel_ratio: int, embed_dim: int, num_heads: int,
                 patch_size: int = 16, depth: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, last_fusion_stride: int = 2, cam_head_kernel: int | None = None):
        super().__init__()
        if depth % 3 or patch_size % 16:
            raise ValueError(f"depth must be a multiple of 3 and patch_size of 16, got {depth} and {patch_size}")
        if last_fusion_stride not in (1, 2):
            raise ValueError(f"last_fusion_stride must be 1 (TransCAM) or 2 (Conformer), got {last_fusion_stride}")
        self.patch_size, self.depth, self.num_classes = patch_size, depth, num_classes
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()  # rising linearly over the blocks
        block_args = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        channels = [STEM_CHANNELS * channel_ratio * 2 ** stage for stage in range(3)]  # CNN stages, strides 4, 8, 16
        first_ratio = patch_size // 4  # token stride over the stem's stride
        self.conv_1 = Bottleneck(STEM_CHANNELS, channels[0], projection=True)
        self.trans_patch_conv = nn.Conv2d(STEM_CHANNELS, embed_dim, first_ratio, stride=first_ratio)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_paths[0],
                             norm_layer=LayerNorm)
        blocks_per_stage = depth // 3
        for index in range(2, depth + 1):
            stage = (index - 1) // blocks_per_stage
            opens_stage = stage > 0 and (index - 1) % blocks_per_stage == 0
            self.add_module(f"conv_trans_{index}", ConvTransBlock(
                channels[stage - 1] if opens_stage else channels[stage], channels[stage],
                stride=2 if opens_stage else 1, ratio=first_ratio // 2 ** stage, drop_path=drop_paths[index - 1],
                fusion_stride=last_fusion_stride if index == depth else None, **block_args))
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = (nn.Linear(channels[2], num_classes) if cam_head_kernel is None else
                              nn.Conv2d(channels[2], num_classes, cam_head_kernel, padding=cam_head_kernel // 2))
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def transformer_blocks(self) -> list[Block]:
        """Return the depth transformer blocks in order (`trans_1`, then each `conv_trans_i.trans_block`)."""
        return [self.trans_1] + [getattr(self, f"conv_trans_{i}").trans_block for i in range(2, self.depth + 1)]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CNN map [B, 256 * channel_ratio, h, w], normalised tokens [B, 1 + N, D]), N = HW / patch_size^2."""
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"input size {tuple(images.shape[-2:])} is not a multiple of {self.patch_size}")
        stem = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, stride=2, padding=1)  # [B, 64, H/4, W/4]
        x = self.conv_1(stem)[0]
        patches = self.trans_patch_conv(stem).flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = self.trans_1(torch.cat([self.cls_token.expand(len(images), -1, -1), patches], 1))
        for index in range(2, self.depth + 1):
            x, tokens = getattr(self, f"conv_trans_{index}")(x, tokens)
        return x, self.trans_norm(tokens)

    def cam_logits(self, cnn_map: torch.Tensor) -> torch.Tensor:
        """Return the conv head's class scores at every position [B, C, h, w] of a CNN map [B, C_cnn, h, w]."""
        if isinstance(self.conv_cls_head, nn.Linear):
            return F.conv2d(cnn_map, self.conv_cls_head.weight[:, :, None, None], self.conv_cls_head.bias)
        return self.conv_cls_head(cnn_map)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cnn_map, tokens = self.features(images)
        cam_logits = self.cam_logits(cnn_map)
        return cam_logits.mean((2, 3)), self.trans_cls_head(tokens[:, 0]), cam_logits

    @torch.no_grad()
    def cam_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CAM logits [B, C, h, w], head-averaged attention of every block [L, B, 1 + N, 1 + N], float32);
        token 0 is the cls token, then the patches row-major."""
        with AttentionRecorder(block.attn for block in self.transformer_blocks) as recorder:
            cam_logits = self(images)[2]
        return cam_logits, torch.stack(recorder.maps)


def _init_weights(module: nn.Module) -> None:
    """The official initialisation: truncated-normal linears, Kaiming (fan-out) convs, unit norms, zero biases
    (conv biases keep PyTorch's default)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def conformer_s(num_classes: int, **overrides) -> Conformer:
    """Return Conformer-S (channel ratio 4, D 384, depth 12, 6 heads, drop path 0.1) with the official heads;
    `conformer_s(21, **TRANSCAM_SWITCHES)` is TransCAM's network. 37,673,424 parameters at 1000 classes,
    36,465,066 as TransCAM at 21."""
    return Conformer(**{"num_classes": num_classes, "channel_ratio": 4, "embed_dim": 384, "num_heads": 6,
                        "drop_path_rate": 0.1, **overrides})


def conformer_cpu(num_classes: int, **overrides) -> Conformer:
    """Return a CPU-sized Conformer (channel ratio 1, D 192, depth 12, 3 heads) for tests and smoke runs:
    6,610,362 parameters at 21 classes with TransCAM's switches (6,567,354 with the official heads)."""
    return Conformer(**{"num_classes": num_classes, "channel_ratio": 1, "embed_dim": 192, "num_heads": 3,
                        **overrides})
