"""Training helpers shared by the stages that train networks."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss_core.errors import ParamsError


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


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """Return the poly schedule's learning rate base_lr * (1 - step/total)^power."""
    return base_lr * (1 - step / total_steps) ** power


def sgd_two_groups(backbone_params, new_params, lr: float, new_layer_lr_mult: float,
                   weight_decay: float, momentum: float) -> torch.optim.SGD:
    """Return SGD with the backbone at lr and new layers at lr * new_layer_lr_mult.

    Each group keeps its base lr under 'initial_lr' for the poly schedule.
    """
    groups = [
        {"params": [p for p in backbone_params if p.requires_grad], "initial_lr": lr},
        {"params": [p for p in new_params if p.requires_grad], "initial_lr": lr * new_layer_lr_mult},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, power: float) -> None:
    """Set every group's lr from its 'initial_lr' by the poly schedule."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], step, total_steps, power)


def fit(model: nn.Module, train_set: EpochSeededSet,
        batch_loss: Callable[[list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
        optimizer: torch.optim.Optimizer, epochs: int, batch_size: int, device: torch.device, seed: int,
        desc: str, poly_power: float = 0.9,
        on_epoch_end: Callable[[int, dict[str, float]], None] = lambda epoch, means: None,
        num_workers: int = 0, on_epoch_start: Callable[[], None] = lambda: None) -> None:
    """Train model on shuffled, seeded batches with the poly schedule (AMP + loss scaling on CUDA).

    batch_loss gets the batch's tensors on `device` and returns (loss, {name: float} parts);
    on_epoch_start runs after model.train() (e.g. to put frozen BatchNorm back in eval mode);
    on_epoch_end gets the 1-based epoch and each part's mean over the epoch, 'loss' included.
    """
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(enabled=use_amp)
    total, step = epochs * len(loader), 0
    model.to(device)
    for epoch in range(epochs):
        train_set.epoch = epoch
        model.train()
        on_epoch_start()
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            set_poly_lr(optimizer, step, total, poly_power)
            with torch.autocast(device.type, enabled=use_amp):
                loss, parts = batch_loss([tensor.to(device, non_blocking=True) for tensor in batch])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        on_epoch_end(epoch + 1, {key: value / len(loader) for key, value in sums.items()})
