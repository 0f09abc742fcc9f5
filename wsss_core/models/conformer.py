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
Additions for the improved Conformer (../shared/methods/conformer.md, 2.5; `models/conformer_ms.py`):
* `attention`: every transformer block may use the paper's efficient attention (`EfficientAttention` in an
  `EtransBlock`, keys as timm's `Block`; with inner_dim = D the official weights still load). Its attention is
  recorded with the keys expanded back to the token grid (`ExpandedAttentionRecorder`), so `cam_and_attention`
  keeps its shapes.
* `CONFORMER_SIZES` (the official tiny/small/base and a CPU size) and `build_conformer` (TransCAM at a size),
  `mean`/`std`/`cam_stride`, `parameter_groups` and `load_conformer_weights` (a checkpoint file,
  the 1000-class heads left out).
Not carried over from the official code: `num_med_block` (0 in every released model, so no `med_block` keys),
dropout and attention dropout (0 in Conformer-S and TransCAM), and `num_classes=0` (no head).

Input sizes: height and width must be multiples of patch_size (16 for every size built here; multiples of 32
included), otherwise `forward` raises ValueError (the official code fails there with a shape mismatch between
the CNN map and the upsampled tokens). The CAM grid is (H/16, W/16) with `last_fusion_stride=1` and
(ceil(H/32), ceil(W/32)) with 2.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from wsss_core.errors import ParamsError
from wsss_core.models.catalog import CONFORMER_DEPTH, CONFORMER_SIZES
from wsss_core.models.hooks import AttentionRecorder
from wsss_core.models.pretrained import read_state_dict
from wsss_core.models.groups import ParamGroup

STEM_CHANNELS = 64  # stem width and the official `base_channel`: CNN stage s = 0, 1, 2 has 64 * channel_ratio * 2**s
EXPANSION = 4  # bottleneck: mid channels = output channels / 4
TRANSCAM_SWITCHES = {"last_fusion_stride": 1, "cam_head_kernel": 3}
HEAD_PREFIXES = ("trans_cls_head.", "conv_cls_head.")  # the classification heads: new for every task
ETRANS_PRESETS = {  # EfficientAttention kwargs (spec 2.5): D_h = D (pretrained weights load) or D/4 at D = 384
    "default": {"sr_ratio": 2, "sr_mode": "pool1x2", "splits": 4, "split_mode": "channel"},
    "paper_budget": {"inner_dim": 96, "sr_ratio": 2, "sr_mode": "pool1x2", "splits": 4, "split_mode": "channel"},
}

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


class EfficientAttention(nn.Module):
    """The paper's efficient multi-head self-attention (Etrans / eMHSA, spec 2.5, eqs. 3-7) over a cls token and
    a grid of patch tokens: forward(x [B, 1 + N, dim], grid (h, w)) -> [B, 1 + N, dim].

    `qkv` (Linear dim -> 3 * inner_dim, heads of width d = inner_dim / num_heads) and `proj` (inner_dim -> dim)
    carry timm `Attention`'s names, so with inner_dim = dim a Conformer checkpoint loads. Keys and values are
    compressed after the projection (the paper's order) by parameter-free average pooling over the patch grid:
    `sr_mode` "pool1x2" pools 1 x sr_ratio windows (N -> N / r; at r = 2 the spec's 1x2), "pool2x2" pools
    sr_ratio x sr_ratio windows (PVT; N -> N / r^2); an odd side is padded by replicating its last row/column,
    and sr_ratio 1 compresses nothing. The cls token stays in the queries and is appended uncompressed to keys
    and values: N_k = 1 + number of pooled windows.

    `split_mode` "channel" (the paper's shapes): each head's d channels are cut into `splits` contiguous parts
    attended separately, i.e. MHSA with num_heads * splits heads of width d / splits. `split_mode` "spatial" (the
    reading behind the claimed O(N^2 / (s r))): the rows of the compressed key grid are cut into `splits`
    contiguous bands (compressed row i is in band floor(i * splits / rows)); a patch query belongs to the band of
    the compressed row its own token was pooled into and attends to the cls key and that band's keys only; the
    cls query attends to every key; heads keep width d. It is computed as masked dense attention (same result;
    `matmul_macs` counts the grouped cost). `scale` "head": logits scaled by d^-0.5 (the paper, eq. 5); "split":
    by the attended width's inverse square root ((d / splits)^-0.5 for the channel split).
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, inner_dim: int | None = None,
                 sr_ratio: int = 2, sr_mode: str = "pool1x2", splits: int = 4, split_mode: str = "channel",
                 scale: str = "head"):
        super().__init__()
        inner_dim = inner_dim or dim
        if sr_mode not in ("pool1x2", "pool2x2") or split_mode not in ("channel", "spatial") or \
                scale not in ("head", "split") or sr_ratio < 1 or splits < 1:
            raise ValueError(f"unsupported efficient attention: sr_ratio {sr_ratio}, sr_mode {sr_mode!r}, "
                             f"splits {splits}, split_mode {split_mode!r}, scale {scale!r}")
        if inner_dim % (num_heads * splits if split_mode == "channel" else num_heads):
            raise ValueError(f"inner_dim {inner_dim} does not split into {num_heads} heads x {splits} parts")
        head_width = inner_dim // num_heads
        self.maps = num_heads * splits if split_mode == "channel" else num_heads  # attention maps per call
        self.width = inner_dim // self.maps  # channels of one map's queries and keys
        self.scale = (head_width if scale == "head" else self.width) ** -0.5
        self.window = (1, sr_ratio) if sr_mode == "pool1x2" else (sr_ratio, sr_ratio)
        self.inner_dim, self.splits, self.split_mode = inner_dim, splits, split_mode
        self.qkv = nn.Linear(dim, 3 * inner_dim, bias=qkv_bias)
        self.proj = nn.Linear(inner_dim, dim)

    def key_index(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Return (the pooled key of every patch token [N] (0-based among the patch keys), the number of patch
        tokens each pooled key averages [N_k - 1], the compressed grid (h', w'))."""
        (height, width), (rows, columns) = grid, self.window
        compressed = (-(-height // rows), -(-width // columns))
        index = ((torch.arange(height)[:, None] // rows) * compressed[1] + torch.arange(width) // columns).flatten()
        return index, torch.bincount(index, minlength=compressed[0] * compressed[1]), compressed

    def compress(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens [B, 1 + N, C] -> [B, N_k, C]: the cls token, then the patch grid average-pooled by the window
        (odd sides padded by replication), row-major."""
        if self.window == (1, 1):
            return tokens
        rows, columns = self.window
        patches = tokens[:, 1:].transpose(1, 2).unflatten(2, grid)  # [B, C, h, w]
        padding = (0, -grid[1] % columns, 0, -grid[0] % rows)
        if any(padding):
            patches = F.pad(patches, padding, mode="replicate")
        pooled = F.avg_pool2d(patches, self.window).flatten(2).transpose(1, 2)  # [B, N_k - 1, C]
        return torch.cat([tokens[:, :1], pooled], 1)

    def allowed(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Return which keys each query may attend to [1 + N, N_k] (bool), None for the channel split (all)."""
        if self.split_mode == "channel":
            return None
        index, _, (rows, columns) = self.key_index(grid)
        key_band = torch.arange(rows).repeat_interleave(columns) * self.splits // rows  # [N_k - 1]
        allowed = torch.ones(1 + len(index), 1 + len(key_band), dtype=torch.bool)
        allowed[1:, 1:] = key_band[index][:, None] == key_band[None, :]
        return allowed.to(device)

    def heads(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return queries [B, M, 1 + N, c], keys and values [B, M, N_k, c] (M maps of width c)."""
        queries, keys_values = self.qkv(x).split((self.inner_dim, 2 * self.inner_dim), -1)
        keys, values = self.compress(keys_values, grid).chunk(2, -1)
        return tuple(t.unflatten(-1, (self.maps, self.width)).transpose(1, 2) for t in (queries, keys, values))

    def probabilities(self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None
                      ) -> torch.Tensor:
        """Return the softmax attention [B, M, 1 + N, N_k] in float32 (logits too, even under autocast)."""
        with torch.autocast(queries.device.type, enabled=False):
            logits = queries.float() * self.scale @ keys.float().transpose(-2, -1)
            return (logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))).softmax(-1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return the output [B, 1 + N, dim], and with return_attention also the probabilities
        [B, M, 1 + N, N_k] (float32; M = num_heads * splits for the channel split, num_heads for the spatial)."""
        queries, keys, values = self.heads(x, grid)
        allowed = self.allowed(grid, x.device)
        if not return_attention:
            mixed = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, scale=self.scale)
            return self.proj(mixed.transpose(1, 2).flatten(2))
        probabilities = self.probabilities(queries, keys, allowed)
        mixed = probabilities.to(values.dtype) @ values  # [B, M, 1 + N, c]
        return self.proj(mixed.transpose(1, 2).flatten(2)), probabilities

    def expand_keys(self, attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """attention [..., N_k] -> [..., 1 + N]: the cls column unchanged; patch column q = the column of q's
        pooled key divided by the number of patch tokens that key pooled (row sums are kept)."""
        index, counts, _ = self.key_index(grid)
        index, counts = index.to(attention.device), counts.to(attention.device)
        return torch.cat([attention[..., :1], attention[..., 1:].index_select(-1, index) / counts[index]], -1)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Return the attention x [B, 1 + N, dim] gets, averaged over the M maps, keys expanded
        [B, 1 + N, 1 + N] (float32; rows sum to 1)."""
        queries, keys, _ = self.heads(x, grid)
        return self.expand_keys(self.probabilities(queries, keys, self.allowed(grid, x.device)).mean(1), grid)

    def matmul_macs(self, batch: int, grid: tuple[int, int]) -> int:
        """Return the multiply-adds of the q k^T and attention x v products for one call (the spatial split
        counted as grouped: only the allowed query-key pairs)."""
        index, counts, _ = self.key_index(grid)
        allowed = self.allowed(grid, torch.device("cpu"))
        pairs = (1 + len(index)) * (1 + len(counts)) if allowed is None else int(allowed.sum())
        return 2 * batch * pairs * self.inner_dim


class EtransBlock(nn.Module):
    """Pre-norm transformer block with `EfficientAttention`: forward(x [B, 1 + N, D], grid (h, w)) ->
    [B, 1 + N, D]; x + DropPath(attn(LN(x))), then x + DropPath(MLP(LN(x))). Keys as timm's `Block`
    (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, drop_path: float,
                 attention: dict):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = EfficientAttention(dim, num_heads, qkv_bias=qkv_bias, **attention)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def transformer_block(dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, drop_path: float,
                      attention: dict | None) -> nn.Module:
    """Return timm's `Block` (attention None: standard MHSA) or an `EtransBlock` with those attention kwargs."""
    if attention is None:
        return Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path, norm_layer=LayerNorm)
    return EtransBlock(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path, attention=attention)


def run_block(block: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Return block(tokens) [B, 1 + N, D]; an `EtransBlock` also gets the token grid (h, w)."""
    return block(tokens, grid) if isinstance(block, EtransBlock) else block(tokens)


class ExpandedAttentionRecorder(AttentionRecorder):
    """`AttentionRecorder` for `EfficientAttention` modules: `maps` gets each call's `attention_map`
    [B, 1 + N, 1 + N] (always the mean over the maps, keys expanded back to the token grid; `reduce` is unused)."""

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.maps.append(module.attention_map(*args[:2]))


@torch.no_grad()
def cam_and_attention(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (CAM logits on the token grid [B, C, H/16, W/16] (bilinear, to size, where the CAM stride is 32),
    head-averaged attention of every transformer block [L, B, 1 + N, 1 + N], float32) of a Conformer or
    ConformerMS; token 0 is the cls token, then the patches row-major; efficient attention's compressed keys are
    expanded back to the patches (`EfficientAttention.expand_keys`)."""
    with attention_recorder(model.transformer_blocks) as recorder:
        cam_logits = model(images)[2]
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    if tuple(cam_logits.shape[-2:]) != grid:
        cam_logits = F.interpolate(cam_logits, size=grid, mode="bilinear", align_corners=False)
    return cam_logits, torch.stack(recorder.maps)


def attention_recorder(blocks: list[nn.Module]) -> AttentionRecorder:
    """Return a recorder of the head-averaged attention [B, 1 + N, 1 + N] of each block's `attn`."""
    modules = [block.attn for block in blocks]
    if all(isinstance(module, EfficientAttention) for module in modules):
        return ExpandedAttentionRecorder(modules)
    return AttentionRecorder(modules)


class ConvTransBlock(nn.Module):
    """One coupled block (official `ConvTransBlock`): CNN bottleneck, FCU-down, transformer block, FCU-up and the
    fusion bottleneck. `ratio` is the CNN map's size over the token grid's (4, 2, 1 for the stages at patch 16);
    `attention` as in `transformer_block`."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, ratio: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, fusion_stride: int | None,
                 attention: dict | None = None):
        super().__init__()
        mid_channels = out_channels // EXPANSION
        resized = stride > 1 or in_channels != out_channels
        self.cnn_block = Bottleneck(in_channels, out_channels, stride=stride, projection=resized)
        self.fusion_block = Bottleneck(out_channels, out_channels, stride=fusion_stride or 1,
                                       projection=fusion_stride is not None)
        self.squeeze_block = CouplingDown(mid_channels, embed_dim, ratio)
        self.expand_block = CouplingUp(embed_dim, mid_channels, ratio)
        self.trans_block = transformer_block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                             drop_path=drop_path, attention=attention)
        self.ratio = ratio

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, H, W], tokens [B, 1 + N, D] -> (x [B, C_out, H', W'], tokens [B, 1 + N, D])."""
        x, mid = self.cnn_block(x)
        grid = (mid.shape[-2] // self.ratio, mid.shape[-1] // self.ratio)
        tokens = run_block(self.trans_block, self.squeeze_block(mid, tokens) + tokens, grid)  # cls twice, as official
        injected = self.expand_block(tokens, *grid)  # [B, C_out/4, H, W]
        return self.fusion_block(x, injected)[0], tokens


class Conformer(nn.Module):
    """forward(images [B, 3, H, W]) -> (conv logits [B, C], transformer logits [B, C], CAM logits [B, C, h, w]).

    The conv logits are the spatial mean of the CAM logits. With `cam_head_kernel` None (Conformer) the head is
    the linear `conv_cls_head` applied at every position (the classic CAM), so the mean equals the official
    pool-then-linear logits; with a kernel k (TransCAM: 3) it is a k x k conv. The transformer logits are
    `trans_cls_head` on the normalised cls token. (h, w) = (H/16, W/16) for `last_fusion_stride` 1, (ceil(H/32),
    ceil(W/32)) for 2; H and W must be multiples of patch_size. See the module docstring for the names.
    `attention` None: timm's standard attention; a dict: every block's attention is an `EfficientAttention` with
    those kwargs (the paper's Etrans; inner_dim = embed_dim keeps the official keys and shapes).
    """

    def __init__(self, *, num_classes: int, channel_ratio: int, embed_dim: int, num_heads: int,
                 patch_size: int = 16, depth: int = CONFORMER_DEPTH, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, last_fusion_stride: int = 2, cam_head_kernel: int | None = None,
                 attention: dict | None = None):
        super().__init__()
        if depth % 3 or patch_size % 16:
            raise ValueError(f"depth must be a multiple of 3 and patch_size of 16, got {depth} and {patch_size}")
        if last_fusion_stride not in (1, 2):
            raise ValueError(f"last_fusion_stride must be 1 (TransCAM) or 2 (Conformer), got {last_fusion_stride}")
        self.patch_size, self.depth, self.num_classes = patch_size, depth, num_classes
        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()  # rising linearly over the blocks
        block_args = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                          attention=attention)
        self.mean, self.std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
        self.cam_stride = patch_size * last_fusion_stride  # of the CAM logits, in input pixels

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        channels = [STEM_CHANNELS * channel_ratio * 2 ** stage for stage in range(3)]  # CNN stages, strides 4, 8, 16
        first_ratio = patch_size // 4  # token stride over the stem's stride
        self.conv_1 = Bottleneck(STEM_CHANNELS, channels[0], projection=True)
        self.trans_patch_conv = nn.Conv2d(STEM_CHANNELS, embed_dim, first_ratio, stride=first_ratio)
        self.trans_1 = transformer_block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                         drop_path=drop_paths[0], attention=attention)
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
    def transformer_blocks(self) -> list[nn.Module]:
        """Return the depth transformer blocks in order (`trans_1`, then each `conv_trans_i.trans_block`)."""
        return [self.trans_1] + [getattr(self, f"conv_trans_{i}").trans_block for i in range(2, self.depth + 1)]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CNN map [B, 256 * channel_ratio, h, w], normalised tokens [B, 1 + N, D]), N = HW / patch_size^2."""
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"input size {tuple(images.shape[-2:])} is not a multiple of {self.patch_size}")
        stem = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, stride=2, padding=1)  # [B, 64, H/4, W/4]
        x = self.conv_1(stem)[0]
        patches = self.trans_patch_conv(stem)  # [B, D, H/16, W/16]
        grid = tuple(patches.shape[-2:])
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = run_block(self.trans_1, torch.cat([self.cls_token.expand(len(images), -1, -1), patches], 1), grid)
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

    def cam_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `cam_and_attention(self, images)`."""
        return cam_and_attention(self, images)

    def parameter_groups(self, new_layer_lr_mult: float) -> list[ParamGroup]:
        """Return the groups of `conformer_parameter_groups`."""
        return conformer_parameter_groups(self, new_layer_lr_mult)


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


def conformer_parameter_groups(model: nn.Module, new_layer_lr_mult: float,
                               undecayed: tuple[str, ...] = ("cls_token",)) -> list[ParamGroup]:
    """Return the network's weights ("backbone", decayed) and its biases, norms and the parameters named in
    `undecayed` ("backbone_no_decay"), then the classification heads' weights ("new") and biases ("new_bias")
    at lr x new_layer_lr_mult."""
    body = [(name, p) for name, p in model.named_parameters() if not name.startswith(HEAD_PREFIXES)]
    heads = [(name, p) for name, p in model.named_parameters() if name.startswith(HEAD_PREFIXES)]
    return [ParamGroup("backbone", [p for name, p in body if p.ndim > 1 and name not in undecayed]),
            ParamGroup("backbone_no_decay", [p for name, p in body if p.ndim <= 1 or name in undecayed],
                       weight_decay=False),
            ParamGroup("new", [p for _, p in heads if p.ndim > 1], new_layer_lr_mult),
            ParamGroup("new_bias", [p for _, p in heads if p.ndim <= 1], new_layer_lr_mult, weight_decay=False)]


def load_conformer_weights(model: nn.Module, path: str | Path, key: str = "cls.pretrained") -> list[str]:
    """Load a Conformer checkpoint in the official layout into model; return the sorted checkpoint keys skipped.

    The 1000-class heads (`trans_cls_head.*`, `conv_cls_head.*`) are always skipped. A `Conformer` takes every
    other key strictly (same names and shapes); any other model (`ConformerMS`) takes the keys whose name and
    shape match, and must find all of its `pretrained_keys()` among them. Anything else is a one-line ParamsError
    naming `key`, the file and the first offending keys.
    """
    state = read_state_dict(path, key)
    own = model.state_dict()
    fits = {k: v for k, v in state.items()
            if not k.startswith(HEAD_PREFIXES) and k in own and tuple(v.shape) == tuple(own[k].shape)}
    if isinstance(model, Conformer):
        body = {k for k in set(own) | set(state) if not k.startswith(HEAD_PREFIXES)}
        missing = sorted(k for k in body - set(fits) if k not in state)
        unexpected = sorted(k for k in body - set(fits) if k not in own)
        mismatched = sorted(body - set(fits) - set(missing) - set(unexpected))
        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("of another shape", mismatched))
        faults = [f"{len(keys)} {kind} (e.g. {keys[:3]})" for kind, keys in kinds if keys]
        if faults:
            raise ParamsError(f"{key}: {path} does not fit the Conformer: {', '.join(faults)}")
    else:
        absent = [k for k in model.pretrained_keys() if k not in fits]
        if absent:
            raise ParamsError(f"{key}: {path} is not a Conformer checkpoint for this network: {len(absent)} of its "
                              f"transformer-branch keys are missing or of another shape (e.g. {absent[:3]})")
    model.load_state_dict(fits, strict=False)
    return sorted(set(state) - set(fits))


def build_conformer(size: str, num_classes: int, *, cam_head_kernel: int = 3, drop_path: float | None = None,
                    **overrides) -> Conformer:
    """Return TransCAM's network (last fusion stride 1, a cam_head_kernel conv CAM head) at a `CONFORMER_SIZES`
    size, with its drop path unless drop_path is given; overrides replace any other constructor argument (e.g.
    `attention`)."""
    config = {**CONFORMER_SIZES[size], **TRANSCAM_SWITCHES, "cam_head_kernel": cam_head_kernel}
    if drop_path is not None:
        config["drop_path_rate"] = drop_path
    return Conformer(**{**config, **overrides}, num_classes=num_classes)


def conformer_s(num_classes: int, **overrides) -> Conformer:
    """Return Conformer-S (channel ratio 4, D 384, depth 12, 6 heads, drop path 0.1) with the official heads;
    `conformer_s(21, **TRANSCAM_SWITCHES)` is TransCAM's network. 37,673,424 parameters at 1000 classes,
    36,465,066 as TransCAM at 21."""
    return Conformer(**{"num_classes": num_classes, **CONFORMER_SIZES["conformer_small_patch16"], **overrides})


def conformer_cpu(num_classes: int, **overrides) -> Conformer:
    """Return a CPU-sized Conformer (channel ratio 1, D 192, depth 12, 3 heads) for tests and smoke runs:
    6,610,362 parameters at 21 classes with TransCAM's switches (6,567,354 with the official heads)."""
    return Conformer(**{"num_classes": num_classes, **CONFORMER_SIZES["conformer_cpu"], **overrides})
