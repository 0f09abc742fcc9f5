"""Classifier training step: Multi-SA (k attended taps, stacked and fused at stride 8) against the plain
CAM network on the same backbone, batch and output stride, and our fuse-after-pooling forward against
the paper's literal order (fuse conv on every pixel, then pooling), one run. Run it alone on the machine.

    python bench/multisa_step.py --backbone resnet18 --batch 16 --size 160            # synthetic default
    python bench/multisa_step.py --backbone tf_efficientnet_lite0 --batch 16 --size 256   # voc12-mini
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from step_timing import median_step_seconds

from wsss_core.config import ClsParams
from wsss_core.models.backbones import Backbone
from wsss_core.models.cam_net import CamNet
from wsss_core.models.multisa import MultiSANet
from wsss_core.training import build_optimizer


class PerPixelFuse(MultiSANet):
    """The straightforward reference: logits = classifier(GAP(fuse(Z))), the fuse conv on every pixel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fused(images).mean(dim=(2, 3), keepdim=True)).flatten(1)


def step_seconds(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Median seconds of forward, multi-label loss, backward and an SGD step, after two warm-up steps."""
    optimizer = build_optimizer(model.parameter_groups(10.0), ClsParams(nesterov=True))
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = (torch.rand(args.batch, 20) < 0.2).float()
    return median_step_seconds(lambda: F.multilabel_soft_margin_loss(model(images), labels), optimizer, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    plain = step_seconds(CamNet(Backbone(args.backbone, args.output_stride), 20).train(), args)
    print(f"{args.backbone} at output stride {args.output_stride}, batch {args.batch} at {args.size} px, "
          f"{torch.get_num_threads()} threads")
    print(f"cam: {plain:.2f} s/step")
    for layers in (1, 2, 3):
        torch.manual_seed(0)
        seconds = step_seconds(MultiSANet(Backbone(args.backbone, args.output_stride), 20, layers=layers).train(), args)
        print(f"multisa, {layers} attended: {seconds:.2f} s/step, {seconds / plain:.2f}x the cam step")
    torch.manual_seed(0)
    literal = step_seconds(PerPixelFuse(Backbone(args.backbone, args.output_stride), 20).train(), args)
    print(f"multisa, 3 attended, fuse conv on every pixel (reference): {literal:.2f} s/step; "
          f"ours (fuse after pooling) {literal / seconds:.2f}x faster")


if __name__ == "__main__":
    main()
