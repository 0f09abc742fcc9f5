"""An ordered process pool for per-image jobs (CRFs, affinity labels), one compute thread per worker."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import Pool, get_context
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from wsss_core.errors import DataError, WsssError

MAX_CHUNKSIZE = 4
"""Largest number of jobs sent to a worker at once: a chunk of VOC-sized arrays stays small and the tail balances."""
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _single_threaded_worker() -> None:
    """Pool initializer: one compute thread per worker, so workers do not compete for the cores."""
    for name in THREAD_ENV_VARS:
        os.environ[name] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


class _Failure:
    """What a worker returns instead of raising: the error, to be raised in the parent naming the job."""

    def __init__(self, error: BaseException):
        self.error = error if isinstance(error, WsssError) else None
        self.text = f"{type(error).__name__}: {error}"


class _Guarded:
    """function(job), with any exception turned into a _Failure (picklable, for pool workers)."""

    def __init__(self, function: Callable):
        self.function = function

    def __call__(self, job):
        try:
            return self.function(job)
        except Exception as err:  # noqa: BLE001 - reported in the parent, naming the job
            return _Failure(err)


def _job_name(job, index: int) -> str:
    first = job[0] if isinstance(job, tuple) and job else None
    return f"job {index} ({first})" if isinstance(first, str) else f"job {index}"


def usable_cores(quota_file: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Return the cores this process may use: its CPU affinity (taskset, a scheduler's allocation), capped by the
    cgroup v2 CPU quota when one is set ("200000 100000" in cpu.max: 2 cores), shared among torchrun's local
    processes (LOCAL_WORLD_SIZE); at least 1."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = open(quota_file, encoding="ascii").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity alone
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def run_pool(function: Callable, jobs: Iterable, workers: int, total: int | None = None, desc: str = "dcrf"
             ) -> Iterator:
    """Yield function(job) for every job, in job order, computed in `workers` processes.

    workers=0 uses the cores this process may use (usable_cores: affinity, cgroup quota, shared among
    torchrun's local processes) so that sharded stages and allocations do not oversubscribe them; workers=1 runs in this process. function must be picklable (top
    level, or a functools.partial of one). total (the number of jobs, when known) sizes the chunks
    and the progress bar, which shows rate and ETA. A job that raises stops the pool: a WsssError is raised as it
    is, any other error as a DataError naming the job (its index, and its id when the job is a tuple starting
    with one), so the stage fails in one line and its writers remove their temporaries.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if total is None and hasattr(jobs, "__len__"):
        total = len(jobs)
    return _pool_results(function, jobs, workers or usable_cores(), total, desc)


def _pool_results(function: Callable, jobs: Iterable, workers: int, total: int | None, desc: str) -> Iterator:
    """The generator behind run_pool; workers >= 1."""
    names: list[str] = []

    def named(items: Iterable) -> Iterator:
        for index, job in enumerate(items):
            names.append(_job_name(job, index))
            yield job

    def checked(result, index: int):
        if isinstance(result, _Failure):
            raise result.error or DataError(f"{desc}: {names[index]} failed in a worker ({result.text})")
        return result

    guarded = _Guarded(function)
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as progress:
        if workers == 1:
            for index, job in enumerate(named(jobs)):
                result = checked(guarded(job), index)
                progress.update()
                yield result
            return
        chunksize = max(1, min(MAX_CHUNKSIZE, (total or 0) // (workers * 4)))
        with Pool(workers, initializer=_single_threaded_worker) as pool:
            for index, result in enumerate(pool.imap(guarded, named(jobs), chunksize=chunksize)):
                result = checked(result, index)
                progress.update()
                yield result


class WorkerPool:
    """Worker processes kept across calls, for small batches of jobs many times over (a training step's CRFs):
    workers as in run_pool (0: one per usable core; 1: this process), at most one per job, started at the first map
    from a fork server (the training process's threads and CUDA state are not forked); a worker that dies
    raises BrokenProcessPool instead of hanging."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers or usable_cores()
        self._executor: ProcessPoolExecutor | None = None

    def map(self, function: Callable, jobs: Sequence) -> list:
        """Return [function(job) for job in jobs], in order, the jobs split evenly over the workers."""
        workers = min(self.workers, len(jobs))
        if workers <= 1:
            return [function(job) for job in jobs]
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=get_context("forkserver"),
                                                 initializer=_single_threaded_worker)
        return list(self._executor.map(function, jobs, chunksize=-(-len(jobs) // self.workers)))

    def close(self) -> None:
        """Stop the workers (a later map starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None
