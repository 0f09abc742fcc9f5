"""Classifier training step and CAM export speed: our AMP paths against plain fp32, in one run.

Ours: `training.fit` (bfloat16 autocast + channels_last on CUDA) for the step, and
`cams.infer.multiscale_maps` as export_cams runs it (float16 autocast + channels_last on CUDA).
The reference: a straightforward fp32 loop on the same model and inputs. On a CPU both run in
fp32, so the ratio there is about 1. `--variants` also times plain loops in each precision/layout.

    python bench/amp.py --backbone resnet50 --batch 8 --size 224 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsss_core.cams.infer import multiscale_maps
from wsss_core.config import ClsParams
from wsss_core.methods.cam import CamMethod
from wsss_core.training import EpochSeededSet, build_optimizer, fit, memory_format, place


class RandomBatches(EpochSeededSet):
    """`count` fixed random samples {'images': [3, S, S], 'labels': [K]} (no decoding: the step alone is timed)."""

    def __init__(self, count: int, size: int, num_classes: int):
        super().__init__([str(i) for i in range(count)], seed=0)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = (torch.rand(count, num_classes, generator=generator) < 0.2).float()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[index], "labels": self.labels[index]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_steps(model, data: RandomBatches, recipe: ClsParams, device: torch.device,
                    dtype: torch.dtype | None = None, channels_last: bool = False) -> float:
    """Seconds per plain step over the second of two epochs: the same loader as fit (pinned on CUDA), then
    forward, loss, backward, SGD step; dtype: autocast to it (float16 with a GradScaler)."""
    optimizer = build_optimizer(model.parameter_groups(recipe.new_layer_lr_mult), recipe)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.train().to(device, memory_format=layout)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda")
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True, memory_format=layout)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.multilabel_soft_margin_loss(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds / len(loader)


def our_steps(method: CamMethod, model, data: RandomBatches, recipe: ClsParams, device: torch.device) -> float:
    """Seconds per step of training.fit over the second of two epochs (loader, step, schedule, progress bar)."""
    stamps = []

    def mark(*_):
        synchronize(device)
        stamps.append(time.perf_counter())

    fit(model, data, partial(method.training_loss, model), recipe=recipe.model_copy(update={"epochs": 2}),
        device=device, seed=0, desc="bench fit", on_epoch_end=mark)
    return (stamps[1] - stamps[0]) / (len(data) // recipe.batch_size)  # the second epoch: end of 1 to end of 2


def export_rate(model, images: torch.Tensor, device: torch.device, ours: bool, repeats: int) -> float:
    """Images per second of the multi-scale + flip CAM pass (IRN's 4 scales) on one batch.

    ours: as export_cams runs it (float16 autocast and channels_last on CUDA); else plain fp32.
    """
    cam_maps = partial(CamMethod().cam_maps, model)
    amp = ours and device.type == "cuda"
    model.eval()
    if ours:
        place(model, device)
        images = images.to(device, memory_format=memory_format(device))
    else:
        model.to(device, memory_format=torch.contiguous_format)
        images = images.to(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            multiscale_maps(cam_maps, images, [1.0, 0.5, 1.5, 2.0], flip=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=12, help="steps per epoch (two epochs are run, the second timed)")
    parser.add_argument("--export-size", type=int, nargs=2, default=(352, 480), help="H W of the export batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", action="store_true", help="also time fp16/bf16 and channels_last plain loops")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    recipe = ClsParams(backbone=args.backbone, batch_size=args.batch, epochs=1, crop_size=args.size, lr=0.01)
    method = CamMethod()
    data = RandomBatches(args.batch * args.steps, args.size, 20)
    torch.manual_seed(0)
    reference = reference_steps(method.build_classifier(recipe, 20), data, recipe, device)
    torch.manual_seed(0)
    ours = our_steps(method, method.build_classifier(recipe, 20), data, recipe, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, {args.backbone}, batch {args.batch} at {args.size} px")
    print(f"train step: fp32 reference {reference * 1000:.1f} ms, ours (fit: bf16 + channels_last on CUDA) "
          f"{ours * 1000:.1f} ms: "
          f"{reference / ours:.2f}x")
    if args.variants and device.type == "cuda":
        for dtype, channels_last in ((None, True), (torch.float16, False), (torch.float16, True),
                                     (torch.bfloat16, False), (torch.bfloat16, True)):
            torch.manual_seed(0)
            seconds = reference_steps(method.build_classifier(recipe, 20), data, recipe, device, dtype, channels_last)
            print(f"  plain loop, {str(dtype).replace('torch.', '') if dtype else 'fp32'}"
                  f"{', channels_last' if channels_last else ''}: {seconds * 1000:.1f} ms ({reference / seconds:.2f}x)")
    model = method.build_classifier(recipe, 20)
    images = torch.randn(args.batch, 3, *args.export_size)
    plain = export_rate(model, images, device, ours=False, repeats=5)
    amp = export_rate(model, images, device, ours=True, repeats=5)
    print(f"CAM export ({args.export_size[0]}x{args.export_size[1]}, scales 1/0.5/1.5/2 + flip): fp32 "
          f"{plain:.1f} img/s, ours (float16 autocast + channels_last on CUDA) {amp:.1f} img/s: {amp / plain:.2f}x")


if __name__ == "__main__":
    main()
