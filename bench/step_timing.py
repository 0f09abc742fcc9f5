"""The timing helper of the training-step benchmarks (run from the repo root as `python bench/<name>.py`)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_step_seconds(loss_of_batch: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, steps: int,
                        warmup: int = 2) -> float:
    """Return the median seconds of forward (loss_of_batch), backward and an optimizer step, after warm-up steps
    (CUDA synchronised before each reading)."""
    times = []
    for _ in range(steps + warmup):
        start = time.perf_counter()
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])
