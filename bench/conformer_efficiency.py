"""Etrans efficiency on the TransCAM-S skeleton (Conformer-S, 21 classes, 3x3 CAM head, last fusion stride 1):
parameters and multiply-adds of standard attention against the `EfficientAttention` presets, for the whole network
and for the 12 attention modules alone, and whether the spec's bounds hold (../shared/methods/conformer.md, 2.5 and
section 8 test 24: `paper_budget` params -12..-20 %, MACs -10..-16 %, analytic -14.6 % / -12.4 %; `default` params
unchanged, MACs lower). MACs from `conformer_ms.count_macs` (Conv2d, Linear, q k^T and attention x v); one forward
per network on CPU, a few seconds.

    python bench/conformer_efficiency.py
    python bench/conformer_efficiency.py --size 512
"""
from __future__ import annotations

import argparse

import torch

from wsss_core.models.conformer import ETRANS_PRESETS, TRANSCAM_SWITCHES, conformer_s
from wsss_core.models.conformer_ms import count_macs

VOC_CLASSES = 21
PAPER_BUDGET_BOUNDS = {"params": (0.12, 0.20), "macs": (0.10, 0.16)}  # spec section 8, test 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="square input side (a multiple of 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images = torch.randn(1, 3, args.size, args.size)
    rows = {"standard": conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES).eval()}
    rows.update({name: conformer_s(VOC_CLASSES, **TRANSCAM_SWITCHES, attention=preset).eval()
                 for name, preset in ETRANS_PRESETS.items()})
    counts = {}
    for name, model in rows.items():
        modules = [block.attn for block in model.transformer_blocks]
        counts[name] = (sum(p.numel() for p in model.parameters()), count_macs(model, images),
                        sum(p.numel() for module in modules for p in module.parameters()),
                        count_macs(model, images, layers=False))
    base = counts["standard"]
    print(f"TransCAM-S skeleton at {args.size} x {args.size}, batch 1")
    print(f"{'attention':<14}{'params':>14}{'change':>9}{'MACs (G)':>11}{'change':>9}"
          f"{'attn params':>14}{'attn matmul MACs (G)':>22}")
    for name, (params, macs, attn_params, attn_macs) in counts.items():
        print(f"{name:<14}{params:>14,}{params / base[0] - 1:>+9.1%}{macs / 1e9:>11.3f}{macs / base[1] - 1:>+9.1%}"
              f"{attn_params:>14,}{attn_macs / 1e9:>22.3f}")
    budget, default = counts["paper_budget"], counts["default"]
    params_cut, macs_cut = 1 - budget[0] / base[0], 1 - budget[1] / base[1]
    (params_low, params_high), (macs_low, macs_high) = PAPER_BUDGET_BOUNDS["params"], PAPER_BUDGET_BOUNDS["macs"]
    print(f"paper_budget: params reduction {params_cut:.1%} in [{params_low:.0%}, {params_high:.0%}]: "
          f"{params_low <= params_cut <= params_high}; MACs reduction {macs_cut:.1%} in "
          f"[{macs_low:.0%}, {macs_high:.0%}]: {macs_low <= macs_cut <= macs_high} (analytic -14.6 % / -12.4 %)")
    print(f"default: params unchanged: {default[0] == base[0]}; MACs lower: {default[1] < base[1]}")
    print(f"12 standard attention modules: {base[2]:,} params (spec: 7,096,320)")


if __name__ == "__main__":
    main()
