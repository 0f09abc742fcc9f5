"""Classifier training step of `transcam` and `conformer_ms` (Table 1's rows, and CSConv alone) at a Conformer
size: forward through the method's loss (conv + transformer multi-label soft margin), backward and an AdamW step,
median of a few steps after two warm-up steps, one run. Run it alone on the machine.

    python bench/conformer_step.py --size conformer_cpu --batch 16 --crop 160            # the synthetic default
    python bench/conformer_step.py --size conformer_small_patch16 --batch 8 --crop 224
"""
from __future__ import annotations

import argparse

import torch
from step_timing import median_step_seconds

from wsss_core.config import parse_params
from wsss_core.methods import get_method, method_params
from wsss_core.models.catalog import CONFORMER_BACKBONES
from wsss_core.training import build_optimizer

OFF = {"enabled": False}
ROWS = {  # name: (method, model section)
    "transcam": ("transcam", {}),
    "conformer_ms: Etrans only": ("conformer_ms", {"csconv": OFF, "mfuc": OFF}),
    "conformer_ms: CSConv only (not in Table 1)": ("conformer_ms", {"etrans": OFF, "mfuc": OFF}),
    "conformer_ms: all three": ("conformer_ms", {}),
}


def step_seconds(method_name: str, model: dict, args: argparse.Namespace) -> tuple[float, int]:
    """Return (median seconds per training step, parameters) of one row."""
    params = parse_params({"method": method_name, "cls": {"backbone": args.size},
                           "methods": {method_name: {"model": model}}}, method_params())
    method = get_method(params)
    torch.manual_seed(0)
    network = method.build_classifier(params.cls, args.classes, pretrained=False).train()
    optimizer = build_optimizer(network.parameter_groups(1.0), params.cls.model_copy(update={"optimizer": "adamw"}))
    batch = {"images": torch.randn(args.batch, 3, args.crop, args.crop),
             "labels": (torch.rand(args.batch, args.classes) < 0.2).float()}
    seconds = median_step_seconds(lambda: method.training_loss(network, batch)[0], optimizer, args.steps)
    return seconds, sum(p.numel() for p in network.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="conformer_cpu", choices=CONFORMER_BACKBONES)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=160, help="square crop side (a multiple of 16)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.crop % 16:
        parser.error(f"--crop {args.crop} is not a multiple of 16 (the networks' token stride)")
    print(f"{args.size}, batch {args.batch} at {args.crop} px, {args.classes} classes, {torch.get_num_threads()} threads")
    baseline = None
    for name, (method_name, model) in ROWS.items():
        seconds, parameters = step_seconds(method_name, model, args)
        baseline = baseline or seconds
        print(f"{name:<44}{parameters:>12,} params {seconds:>8.2f} s/step  {seconds / baseline:>5.2f}x transcam")


if __name__ == "__main__":
    main()
