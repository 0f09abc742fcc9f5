"""Reading attention out of timm's transformer blocks without forking their code.

timm's `Attention` computes softmax(q k^T / sqrt(d)) inside a fused kernel and returns only its
output. `attention_probabilities` recomputes the probabilities from the module's own layers and
input (qkv, q_norm, k_norm, scale), `explicit_attention` also returns the output they give (the
test that it equals timm's output pins the recomputation to timm's code), and `AttentionRecorder`
collects them with forward hooks while the unchanged model runs. `feature_affinity` is the semantic affinity
of a feature map that such attention is assumed to approximate.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _queries_keys_values(attention: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return the queries, keys (after q_norm / k_norm) and values [B, M, T, d] of a timm `Attention`."""
    batch, count, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    return attention.q_norm(qkv[0]), attention.k_norm(qkv[1]), qkv[2]


def _softmax(attention: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    with torch.autocast(queries.device.type, enabled=False):  # float32 logits even inside a float16 export
        return (queries.float() * attention.scale @ keys.float().transpose(-2, -1)).softmax(-1)


def attention_probabilities(attention: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Return the softmax attention [B, M, T, T] (float32, each row sums to 1) that a timm `Attention`
    computes for its input tokens [B, T, D]; row t is query token t, column s key token s."""
    queries, keys, _ = _queries_keys_values(attention, tokens)
    return _softmax(attention, queries, keys)


def explicit_attention(attention: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (output [B, T, D], probabilities [B, M, T, T]) of a timm `Attention` in eval mode, computed with
    explicit probabilities: the output equals `attention(tokens)` up to float rounding."""
    queries, keys, values = _queries_keys_values(attention, tokens)
    probabilities = _softmax(attention, queries, keys)
    mixed = attention.norm((probabilities.to(values.dtype) @ values).transpose(1, 2).flatten(2))  # [B, T, M * d]
    if getattr(attention, "gate", None) is not None:
        mixed = mixed * attention.gate(tokens).sigmoid()
    return attention.proj(mixed), probabilities


class AttentionRecorder:
    """Context manager recording each module's attention probabilities while the model runs.

    `with AttentionRecorder(blocks_attn) as recorder: model(x)`; then `recorder.maps` holds one
    `reduce(probabilities [B, M, T, T])` per module call, in call order (default: the mean over heads,
    [B, T, T]). The model's own outputs are untouched.
    """

    def __init__(self, modules: Iterable[nn.Module],
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda probabilities: probabilities.mean(1)):
        self.modules, self.reduce = list(modules), reduce
        self.maps: list[torch.Tensor] = []
        self._handles: list = []

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("AttentionRecorder reads unmasked attention only; this block was called with a mask")
        self.maps.append(self.reduce(attention_probabilities(module, args[0] if args else kwargs["x"])))

    def __enter__(self) -> "AttentionRecorder":
        self.maps = []
        self._handles = [module.register_forward_hook(self._record, with_kwargs=True) for module in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def feature_affinity(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return the semantic affinity [B, N, N] (float32) of features [B, c, h, w], N = h * w row-major: row i is
    softmax_j(cos(f_i, f_j) / temperature), the kind of patch-to-patch map an ImageNet-pretrained ViT's attention
    approximates (the refinements' assumption)."""
    unit = F.normalize(features.flatten(2).float(), dim=1)  # [B, c, N]
    return torch.softmax(unit.transpose(1, 2) @ unit / temperature, -1)
