"""Data-parallel training and sharded per-image work over torch.distributed (processes started by torchrun).

Nothing here starts processes: `torchrun` does, and sets RANK, WORLD_SIZE and LOCAL_RANK, which
`init_process_group` reads. A process not started that way is a world of one, and every helper is then a
no-op, so the one-process path stays the plain one.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from wsss_core.errors import ParamsError


def launched_by_torchrun() -> bool:
    """Return True in a process that torchrun started as one of several (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """Return (rank, world size): (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Return True on rank 0, the one process that writes artifacts, curves and metrics (torchrun's RANK
    before the process group is joined; True in a process torchrun did not start)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def process_group(device: torch.device, backend: str = "auto", timeout_minutes: float = 30.0
                  ) -> Iterator[torch.device]:
    """Join torchrun's process group for the block and yield this process's device; outside torchrun, yield device.

    backend: 'auto' (NCCL on CUDA, gloo on the CPU), 'gloo' or 'nccl'. On CUDA each process takes the GPU of
    its LOCAL_RANK.
    """
    if not launched_by_torchrun():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world()[1] > 1:
        dist.barrier()


def per_rank_batch(global_batch: int, what: str = "batch_size") -> int:
    """Return the batch each rank trains on so that the ranks together train on `global_batch` images a step.

    Raises a ParamsError when the world size does not divide it.
    """
    size = world()[1]
    if global_batch % size:
        raise ParamsError(f"{what} {global_batch} is the global batch and must be a multiple of the "
                          f"{size} processes (dist.nproc)")
    return global_batch // size


class RankSlices(Sampler[list[int]]):
    """Batch sampler yielding this rank's contiguous slice of each global batch of `batches`.

    The ranks' slices of one step, concatenated in rank order, are exactly the global batch, so N processes at
    batch B/N each train on the batches that one process at batch B would.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches)


def global_batches(count: int, batch_size: int, generator: torch.Generator) -> BatchSampler:
    """Return the shuffled global batches (whole batches only, unless all `count` fit in one) that a
    DataLoader(shuffle=True, generator=generator) would draw: the same torch samplers, the same generator."""
    return BatchSampler(RandomSampler(range(count), generator=generator), batch_size, drop_last=count > batch_size)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Return model with its BatchNorm layers made SyncBatchNorm in place (statistics over the global batch) when
    several CUDA processes train; otherwise model unchanged. gloo on the CPU has no SyncBatchNorm, so there each
    process normalises with its own slice's statistics."""
    if world()[1] == 1 or device.type != "cuda":
        return model
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:
        raise ValueError("sync_batchnorm: the model itself is a BatchNorm layer; wrap it in a module")
    return model


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """Return module wrapped in DistributedDataParallel in a world of several processes, else module itself.

    Unused parameters are allowed (ablation switches and frozen branches leave some without gradient).
    """
    if world()[1] == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=True)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Return each value averaged over the ranks (the values themselves in a world of one)."""
    size = world()[1]
    if size == 1 or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / size).tolist()))


def shard_of(items: list, index: int, count: int) -> list:
    """Return shard `index` of `count` of items: every count-th item from position index (balanced, order kept)."""
    return items[index::count]


def parse_shard(text: str) -> tuple[int, int]:
    """Return (index, count) of a shard written 'i/n' with 0 <= i < n; anything else is a one-line ParamsError."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ParamsError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise ParamsError(f"--shard {text!r}: the shard index must be in 0..n-1 and n at least 1")
    return index, count
