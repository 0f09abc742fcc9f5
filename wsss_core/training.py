"""Training helpers shared by the stages that train networks."""
from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss_core.config import TrainRecipe
from wsss_core.distributed import (RankSlices, data_parallel, global_batches, is_main, mean_over_ranks, per_rank_batch,
                                   sync_batchnorm, world)
from wsss_core.errors import DataError, ParamsError
from wsss_core.models.groups import ParamGroup


PROGRESS_EVERY = 10  # steps between progress-bar loss readings (each waits for the GPU)


class EpochSeededSet(torch.utils.data.Dataset):
    """Base for training sets whose augmentation is seeded per (seed, epoch, index); set `epoch` each epoch."""

    def __init__(self, ids: list[str], seed: int):
        self.ids, self.seed, self.epoch = ids, seed, 0

    def __len__(self) -> int:
        return len(self.ids)

    def sample_rng(self, index: int) -> np.random.Generator:
        """Return the generator for sample `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for 'auto' (CUDA when present), 'cpu' or 'cuda'; anything else is a ParamsError."""
    if name not in DEVICES:
        raise ParamsError(f"device {name!r} is not one of: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device=cuda but no CUDA device is available (use device: auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(groups: list[ParamGroup], recipe: TrainRecipe) -> torch.optim.Optimizer:
    """Return the recipe's optimizer (SGD with momentum/nesterov, or AdamW) over the groups' trainable parameters.

    Each torch param group keeps its base lr under 'initial_lr' for the schedule.
    """
    torch_groups = [{"params": [p for p in group.params if p.requires_grad], "name": group.name,
                     "initial_lr": recipe.lr * group.lr_mult, "lr": recipe.lr * group.lr_mult,
                     "weight_decay": recipe.weight_decay if group.weight_decay else 0.0} for group in groups]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(torch_groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, recipe: TrainRecipe) -> float:
    """Return the multiplier of every base lr at a 0-based step: linear warm-up, then poly, cosine or step decay."""
    warmup = min(recipe.warmup_epochs * steps_per_epoch, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if recipe.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return recipe.step_gamma ** sum(epoch >= milestone for milestone in recipe.step_milestones)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if recipe.schedule == "cosine":
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** recipe.poly_power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its 'initial_lr' times factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def memory_format(device: torch.device) -> torch.memory_format:
    """Return channels_last on CUDA (tensor cores run NHWC convolutions fastest), the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Return model moved to device, in channels_last on CUDA (4-D weights only; others are unchanged)."""
    return model.to(device, memory_format=memory_format(device))


def training_precision(device: torch.device, amp: bool) -> tuple[bool, torch.dtype]:
    """Return (autocast on?, its dtype): on CUDA with amp, bfloat16 where the GPU has it (no loss scaling
    needed), else float16 with a GradScaler; fp32 on the CPU."""
    enabled = amp and device.type == "cuda"
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return enabled, dtype


def _to_device(batch, device: torch.device):
    """Return the batch (a list of tensors or a dict of them) on device; 4-D float tensors in memory_format(device)."""
    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.is_floating_point():
            return tensor.to(device, non_blocking=True, memory_format=memory_format(device))
        return tensor.to(device, non_blocking=True)

    if isinstance(batch, dict):
        return {key: move(value) for key, value in batch.items()}
    return [move(tensor) for tensor in batch]


def batches_per_epoch(count: int, batch_size: int) -> int:
    """Return fit's batches per epoch over `count` samples: whole batches only, or one batch of them all when
    they fit in one (the rule of distributed.global_batches, which draws them)."""
    return len(global_batches(count, batch_size, torch.Generator()))


class StepLoss(nn.Module):
    """batch_loss as a module's forward, so that DistributedDataParallel sees every step (its gradient
    averaging arms in forward); the model is a submodule, so its parameters are the ones averaged."""

    def __init__(self, model: nn.Module, batch_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]):
        super().__init__()
        self.model, self.batch_loss = model, batch_loss

    def forward(self, batch):
        return self.batch_loss(batch)


def training_loader(train_set: EpochSeededSet, recipe: TrainRecipe, seed: int, device: torch.device) -> DataLoader:
    """Return the loader of this rank's share of the seeded, shuffled global batches of recipe.batch_size.

    One process gets whole global batches, in the order DataLoader(shuffle=True) draws them with a
    generator seeded by `seed`; N processes (torchrun) each get a contiguous 1/N of every one of them.
    """
    rank, size = world()
    per_rank_batch(recipe.batch_size)  # refuses a global batch that the processes do not divide
    generator = torch.Generator().manual_seed(seed)
    batches = RankSlices(global_batches(len(train_set), recipe.batch_size, generator), rank, size)
    return DataLoader(train_set, batch_sampler=batches, num_workers=recipe.num_workers,
                      pin_memory=device.type == "cuda", generator=generator)


def fit(model: nn.Module, train_set: EpochSeededSet, batch_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]],
        *, recipe: TrainRecipe, device: torch.device, seed: int, desc: str,
        groups: list[ParamGroup] | None = None, steps: int | None = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] = lambda epoch, means: None) -> None:
    """Train model with the recipe's optimizer and schedule on shuffled, seeded batches.

    On CUDA with recipe.amp: autocast to bfloat16 (float16 with loss scaling on GPUs without it) and
    channels_last; the CPU trains in float32. recipe.grad_clip_norm > 0 rescales each step's gradient (over
    the groups' parameters together, after DDP's averaging and loss scaling's undoing) to at most that L2 norm.

    groups: the parameter groups (default: model.parameter_groups(recipe.new_layer_lr_mult)); with
    recipe.freeze_bn the BatchNorm layers of the pretrained groups ('backbone', '<part>_backbone') stay in eval
    mode, their affine parameters frozen (IRN's FixedBatchNorm).
    batch_loss gets the batch (tensors on `device`, a list or a dict as the set returns them) and
    returns (loss, {name: float} parts); on_epoch_end gets the 1-based epoch and each part's mean
    over the epoch, 'loss' included. steps: train this many steps instead of recipe.epochs epochs (the
    schedule spans them; the last epoch may be partial).

    Under torchrun (wsss_core.distributed): recipe.batch_size is the global batch, split over the processes,
    whose gradients DistributedDataParallel averages; the epoch means are averaged over them too, and only
    rank 0 calls on_epoch_end. With a loss that is a mean over its batch this is one process's training,
    but for BatchNorm on the CPU (statistics per process) and losses normalised per process (e.g. over
    the labelled pixels of each slice).
    """
    if not len(train_set):
        raise DataError(f"{desc}: the training set is empty")
    groups = groups or model.parameter_groups(recipe.new_layer_lr_mult)
    optimizer = build_optimizer(groups, recipe)
    trained = [parameter for group in groups for parameter in group.params]  # what grad_clip_norm measures
    loader = training_loader(train_set, recipe, seed, device)
    use_amp, amp_dtype = training_precision(device, recipe.amp)
    scaler = torch.amp.GradScaler(enabled=use_amp and amp_dtype == torch.float16)
    total, step = (steps if steps is not None else recipe.epochs * len(loader)), 0
    epochs = math.ceil(total / len(loader))
    place(sync_batchnorm(model, device), device)
    frozen = batchnorm_layers(model, groups) if recipe.freeze_bn else []
    freeze_batchnorm(frozen)  # before DistributedDataParallel, which averages the trainable parameters only
    step_loss = data_parallel(StepLoss(model, batch_loss), device)
    for epoch in range(epochs):
        train_set.epoch = epoch
        step_loss.train()
        freeze_batchnorm(frozen)
        sums: dict[str, float] = {}
        batches = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch", disable=not is_main())
        for batch in bar:
            if step == total:
                break
            set_lr(optimizer, lr_factor(step, total, len(loader), recipe))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss, parts = step_loss(_to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trained, recipe.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batches += 1
            # The loss stays on the device (float64, as Python sums floats): reading it every step would make
            # the CPU wait for the GPU, so it is read for the progress bar every PROGRESS_EVERY steps only.
            loss_sum = loss_sum + loss.detach().double()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            if step % PROGRESS_EVERY == 0 or bar.n + 1 == len(loader):
                bar.set_postfix(loss=f"{_finite(loss.item(), desc, epoch):.3f}")
        means = mean_over_ranks({"loss": float(loss_sum) / batches,
                                 **{key: value / batches for key, value in sums.items()}}, device)
        _finite(means["loss"], desc, epoch)
        if is_main():
            on_epoch_end(epoch + 1, means)


def _finite(loss: float, desc: str, epoch: int) -> float:
    """Return loss, or raise a one-line ParamsError when it is NaN or infinite (training diverged)."""
    if not math.isfinite(loss):
        raise ParamsError(f"{desc}: the loss became {loss} in epoch {epoch + 1}: training diverged; "
                          f"lower the learning rate (lr) of this stage's params")
    return loss


def batchnorm_layers(model: nn.Module, groups: list[ParamGroup]) -> list[nn.Module]:
    """Return the BatchNorm layers of model whose parameters belong to a pretrained group (ParamGroup.pretrained)."""
    members = {id(p) for group in groups if group.pretrained for p in group.params}
    return [layer for layer in model.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and any(id(p) in members for p in layer.parameters())]


def freeze_batchnorm(layers: list[nn.Module]) -> None:
    """Put BatchNorm layers in eval mode and stop their affine parameters' gradients (IRN's FixedBatchNorm)."""
    for layer in layers:
        layer.eval()
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
