"""Dense CRF throughput: one process against `run_pool` over all cores, on VOC-sized inputs.

Uses the first N images of ../shared/data/voc12-mini when present (else smooth random 375x500
images), each with a smooth random 3-channel probability map. Checks that both runs give identical
marginals and prints images/second, CPU seconds per image (the pool's overhead, which other
load on the machine does not distort) and the speed-up. Usage: python bench/dcrf.py [--images N] [--workers W]
"""
from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one compute thread per process, in both runs

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from wsss_core.crf import dense_crf
from wsss_core.pool import run_pool

VOC_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc12-mini"
VOC_SIZE = (375, 500)
CHANNELS = 3


def smooth_noise(rng: np.random.Generator, channels: int, height: int, width: int, cell: int = 40) -> np.ndarray:
    """Return float32 [channels, H, W] in [0, 1]: uniform noise on a coarse grid, bilinearly upsampled."""
    coarse = rng.random((channels, height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(plane).resize((width, height), Image.BILINEAR))
                     for plane in coarse])


def synthetic_probabilities(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return float32 [CHANNELS, H, W]: softmax of smooth random logits, a distribution per pixel."""
    logits = 6.0 * smooth_noise(rng, CHANNELS, height, width)
    exp = np.exp(logits - logits.max(0))
    return exp / exp.sum(0)


def make_inputs(count: int, seed: int = 0) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Return (source description, [(image uint8 [H, W, 3], probabilities float32 [C, H, W])] * count)."""
    rng = np.random.default_rng(seed)
    paths = sorted((VOC_MINI / "JPEGImages").glob("*.jpg"))[:count]
    if paths:
        images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
        source = f"{len(images)} voc12-mini images"
    else:
        images = [(255 * smooth_noise(rng, 3, *VOC_SIZE).transpose(1, 2, 0)).astype(np.uint8) for _ in range(count)]
        source = f"{count} synthetic {VOC_SIZE[0]}x{VOC_SIZE[1]} images"
    return source, [(image, synthetic_probabilities(rng, *image.shape[:2])) for image in images]


def crf_of(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Pool job: dense_crf marginals of (image, probabilities)."""
    return dense_crf(*job)


def timed(run: Callable[[], list]) -> tuple[list, float, float]:
    """Return (run(), wall seconds, CPU seconds of this process and of its finished child processes)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def cpu_seconds() -> float:
    """Return user+system CPU seconds used so far by this process and its reaped children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="number of images")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="pool processes")
    args = parser.parse_args()
    source, inputs = make_inputs(args.images)
    pixels = sum(image.shape[0] * image.shape[1] for image, _ in inputs)
    print(f"inputs: {source}, {CHANNELS} channels, {pixels / len(inputs) / 1e3:.0f}k pixels each on average")

    single, single_wall, single_cpu = timed(lambda: [crf_of(job) for job in inputs])
    pooled, pool_wall, pool_cpu = timed(lambda: list(run_pool(crf_of, inputs, args.workers, total=len(inputs))))

    identical = all(np.array_equal(a, b) for a, b in zip(single, pooled, strict=True))
    count = len(inputs)
    print(f"single process: {count / single_wall:.2f} images/s, {single_cpu / count:.3f} CPU s/image")
    print(f"run_pool, {args.workers} workers: {count / pool_wall:.2f} images/s, {pool_cpu / count:.3f} CPU s/image")
    print(f"speed-up: {single_wall / pool_wall:.2f}x on {os.cpu_count()} cores "
          f"(CPU overhead of the pool {pool_cpu / single_cpu - 1:+.1%}); results identical: {identical}")
    if not identical:
        raise SystemExit("pooled results differ from single-process results")


if __name__ == "__main__":
    main()
