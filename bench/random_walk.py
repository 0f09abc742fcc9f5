"""Benchmark the sparse random walk against PSA's dense reference on the same VOC-sized inputs.

python bench/random_walk.py [--size 63] [--classes 21] [--batch 8] [--device auto] [--threads N]

Affinities are exp(-mean_c |f_i - f_j|) (AffinityNet's formula) of random features that are
constant per random region plus smooth noise (high within regions, low across their borders); CAMs
are random smooth non-negative maps; the dense reference runs once on image 0, ours runs on image 0
alone and on the whole batch (median of --repeats), and both outputs are compared after PSA's
division by their max.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from wsss_core.affinity.pairs import neighbour_offsets
from wsss_core.affinity.random_walk import random_walk, random_walk_dense
from wsss_core.models.affinity_net import pair_affinities


def smooth_noise(generator: torch.Generator, shape: tuple[int, ...], passes: int = 3) -> torch.Tensor:
    """Return noise [B, C, h, w] blurred by `passes` 5x5 box filters, rescaled to unit std."""
    noise = torch.randn(shape, generator=generator)
    for _ in range(passes):
        noise = F.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    return noise / noise.std()


def region_features(generator: torch.Generator, batch: int, size: int, regions: int = 8, channels: int = 16
                    ) -> torch.Tensor:
    """Return features [B, channels, size, size]: a random vector per Voronoi region of random seeds, plus noise."""
    seeds = torch.rand(batch, regions, 2, generator=generator) * size
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).float()
    region = torch.cdist(grid.view(1, -1, 2).expand(batch, -1, -1), seeds).argmin(-1)  # [B, N]
    embedding = torch.randn(batch, regions, channels, generator=generator)
    features = embedding.gather(1, region[..., None].expand(-1, -1, channels))  # [B, N, channels]
    features = features.transpose(1, 2).reshape(batch, channels, size, size)
    return features + 0.3 * smooth_noise(generator, (batch, channels, size, size))


def timed(function: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Return (median seconds over `repeats` calls, last result)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def max_normalised(cam: torch.Tensor) -> torch.Tensor:
    return cam / cam.max()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=63, help="feature map side h = w")
    parser.add_argument("--classes", type=int, default=21, help="CAM channels C (with background)")
    parser.add_argument("--batch", type=int, default=8, help="images in the batched run")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--radius", type=int, default=5)
    parser.add_argument("--beta", type=float, default=8.0)
    parser.add_argument("--logt", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of ours (the dense one runs once)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    offsets = neighbour_offsets(args.radius)
    generator = torch.Generator().manual_seed(0)
    features = region_features(generator, args.batch, args.size)
    aff_half = pair_affinities(features, offsets).to(device)  # [B, O, h, w]
    cams = F.relu(smooth_noise(generator, (args.batch, args.classes, args.size, args.size))).to(device)
    pixels = args.size ** 2
    print(f"device {device}, torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"B={args.batch} C={args.classes} h=w={args.size} (N={pixels}) radius={args.radius} O={len(offsets)} "
          f"beta={args.beta} logt={args.logt} (t={2 ** args.logt})")
    in_map = aff_half[0][aff_half[0] > 0].float().cpu()
    quartiles = torch.quantile(in_map, torch.tensor([0.25, 0.5, 0.75])).tolist()
    print("affinity quartiles (image 0): " + ", ".join(f"{value:.3f}" for value in quartiles))

    def ours_single() -> torch.Tensor:
        return random_walk(cams[:1], aff_half[:1], offsets, args.beta, args.logt)[0]

    def ours_batched() -> torch.Tensor:
        return random_walk(cams, aff_half, offsets, args.beta, args.logt)

    def dense_single() -> torch.Tensor:
        return random_walk_dense(cams[0], aff_half[0], offsets, args.beta, args.logt)

    ours_single()  # warm-up
    ours_seconds, ours = timed(ours_single, device, args.repeats)
    batched_seconds, batched = timed(ours_batched, device, args.repeats)
    dense_seconds, dense = timed(dense_single, device, 1)

    reference = max_normalised(dense)
    print(f"dense PSA reference (N x N, {args.logt} squarings), 1 image: {dense_seconds:8.3f} s  (1 run)")
    print(f"ours (sparse CSR, {2 ** args.logt} steps), 1 image:         {ours_seconds:8.3f} s  "
          f"(median of {args.repeats})")
    print(f"ours batched B={args.batch}: {batched_seconds:.3f} s = {batched_seconds / args.batch:.3f} s per image "
          f"(median of {args.repeats})")
    print(f"speed-up, 1 image: {dense_seconds / ours_seconds:.1f}x; batched per image: "
          f"{dense_seconds * args.batch / batched_seconds:.1f}x")
    print(f"max |diff| of max-normalised CAMs vs dense: 1 image {(max_normalised(ours) - reference).abs().max():.2e}, "
          f"batched image 0 {(max_normalised(batched[0]) - reference).abs().max():.2e}")


if __name__ == "__main__":
    main()
