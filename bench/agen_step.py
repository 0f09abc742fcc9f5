"""AGEN's joint training step at the cpu profile (both branches EfficientNet-Lite0 at output stride 8, narrowed
heads): forward through every loss (4 BCE, 4 seeding, the CRF boundary loss), backward and an SGD step, median
of a few steps after two warm-up steps; the CRF's share of the step (its wall time, reported by the loss as
crf_ms), the boundary CRFs in this process vs over a process pool, and the fused CoAM vs its explicit N x N
matrix (the straightforward reference), in the whole step and alone at CoAM-3's size (stride 4, forward and
backward). One run; run it alone on the machine.

    python bench/agen_step.py --batch 16 --crop 160      # the synthetic default
    python bench/agen_step.py --batch 16 --crop 256      # voc12-mini
    python bench/agen_step.py --device cuda --amp        # a GPU, bfloat16 autocast as train_cls runs it
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from step_timing import median_step_seconds

from wsss_core.config import parse_params
from wsss_core.methods import get_method, method_params
from wsss_core.models.agen import ContextAttention
from wsss_core.training import build_optimizer, memory_format, training_precision

CPU_MODEL = {"seg_backbone": "tf_efficientnet_lite0", "cls_head_channels": 256, "agm_cls_channels": 64,
             "agm_seg_channels": 128, "seg_head_channels": 128}
ROWS = {  # name: overrides of methods.agen.model
    "full, CRFs over the pool": {"crf": {"workers": 0}},
    "full, CRFs in this process": {"crf": {"workers": 1}},
    "full, CoAM as an explicit matrix": {"coam_impl": "explicit", "crf": {"workers": 1}},
    "full, no boundary loss (no CRF)": {"boundary_weight": 0.0},
    "baseline (no AGM, no CoAM)": {"agm_stages": [], "coam_stages": [], "crf": {"workers": 1}},
}


def step_seconds(model: dict, args: argparse.Namespace) -> tuple[float, float]:
    """Return (median seconds per training step, median CRF milliseconds per step) of one row."""
    params = parse_params({"method": "agen", "cls": {"backbone": "tf_efficientnet_lite0", "lr": 0.01},
                           "methods": {"agen": {"model": {**CPU_MODEL, **model}}}}, method_params())
    method = get_method(params)
    torch.manual_seed(0)
    device = torch.device(args.device)
    network = method.build_classifier(params.cls, args.classes, pretrained=False).train()
    network.to(device, memory_format=memory_format(device))
    use_amp, amp_dtype = training_precision(device, args.amp)
    optimizer = build_optimizer(network.parameter_groups(10.0), params.cls)
    generator = np.random.default_rng(0)
    labels = torch.zeros(args.batch, args.classes)
    labels[torch.arange(args.batch), torch.from_numpy(generator.integers(0, args.classes, args.batch))] = 1
    batch = {"images": torch.randn(args.batch, 3, args.crop, args.crop).to(device, memory_format=memory_format(device)),
             "labels": labels.to(device),
             "rgb": torch.from_numpy(generator.integers(0, 256, (args.batch, args.crop, args.crop, 3), np.uint8)).to(device)}
    crf_ms = []

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            value, parts = method.training_loss(network, batch)
        crf_ms.append(parts.get("crf_ms", 0.0))
        return value

    seconds = median_step_seconds(loss, optimizer, args.steps)
    return seconds, statistics.median(crf_ms[2:])


def coam3_seconds(impl: str, args: argparse.Namespace, repeats: int = 3) -> float:
    """Return the median seconds of CoAM-3 (class maps [batch, classes, crop/4, crop/4], the upper map at crop/8)
    forward and backward with the given impl."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    coam = ContextAttention(impl).to(device)
    coam.gain.data.fill_(0.5)
    side = args.crop // 4
    lower = torch.randn(args.batch, args.classes, side, side, device=device, requires_grad=True)
    upper = torch.randn(args.batch, args.classes, side // 2, side // 2, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        coam(lower, upper).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA (train_cls's cls.amp)")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"AGEN cpu profile, batch {args.batch} at {args.crop} px, {args.classes} classes, {where}, "
          f"amp {args.amp}")
    fused, explicit = coam3_seconds("sdpa", args), coam3_seconds("explicit", args)
    print(f"CoAM-3 alone ({args.crop // 4} x {args.crop // 4} positions), forward and backward: fused {fused:.3f} s, "
          f"explicit matrix {explicit:.3f} s, {explicit / fused:.2f}x faster fused")
    baseline = None
    for name, model in ROWS.items():
        started = time.perf_counter()
        seconds, crf_ms = step_seconds(model, args)
        baseline = baseline or seconds
        print(f"{name:<36}{seconds:>7.2f} s/step  {seconds / baseline:>5.2f}x the first row   CRF {crf_ms:>6.1f} ms "
              f"({100 * crf_ms / 1000 / seconds:4.1f} % of the step)  [{time.perf_counter() - started:.0f} s]")


if __name__ == "__main__":
    main()
