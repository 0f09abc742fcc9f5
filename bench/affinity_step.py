"""AffinityNet training step: PSA's dilated backbone (output stride 8) against the native layout
(stages at strides 8/16/32 resized to stride 8), same batch, one run. Run it alone on the machine.

    python bench/affinity_step.py --backbone tf_efficientnet_lite0 --batch 8 --size 224
"""
from __future__ import annotations

import argparse

import torch
from step_timing import median_step_seconds

from wsss_core.affinity.pairs import neighbour_offsets
from wsss_core.config import AffinityParams
from wsss_core.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss_core.training import build_optimizer


def step_seconds(dilated: bool, args: argparse.Namespace) -> float:
    """Median seconds of forward, PSA's loss, backward and an SGD step, after two warm-up steps."""
    torch.manual_seed(0)
    model = AffinityNet(args.backbone, dilated=dilated).train()
    optimizer = build_optimizer(model.parameter_groups(10.0), AffinityParams())
    offsets = neighbour_offsets(5)
    images = torch.randn(args.batch, 3, args.size, args.size)
    cells = args.size // 8
    masks = [torch.rand(args.batch, len(offsets), cells, cells).round() for _ in range(3)]
    return median_step_seconds(lambda: affinity_loss(pair_affinities(model(images), offsets), *masks)[0], optimizer,
                               args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dilated, native = step_seconds(True, args), step_seconds(False, args)
    print(f"{args.backbone}, batch {args.batch} at {args.size} px, {torch.get_num_threads()} threads")
    print(f"dilated (output stride 8): {dilated:.2f} s/step; native strides: {native:.2f} s/step; "
          f"{dilated / native:.1f}x faster")


if __name__ == "__main__":
    main()
