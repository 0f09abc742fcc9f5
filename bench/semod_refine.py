"""`semod` refinement of one image: ours against the straightforward implementation, on the same stored maps
in one run. Ours: the present classes only (every step is per class) and one top-k selection plus one matrix
product for all patches. Reference: MCTformer's habit of refining all C classes and keeping the present ones,
with eqs. 3-4 as the spec's loop (`refine.attention.semantic_modulation_reference`: for each class and
patch, sort the patch's attention row and average over the top 30%). Also timed: a loop over patches only
(one sort per patch, classes vectorised), to show where the speed comes from. Prints ms per image, the
ratios and the largest difference. Run it alone on the machine.

    python bench/semod_refine.py                      # a VOC image (500 x 375: 31 x 23 tokens), 20 classes
    python bench/semod_refine.py --size 192 192 --classes 6   # the synthetic default
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

from wsss_core.cams.attention import neighbour_count, semantic_modulation_reference
from wsss_core.methods import REGISTRY
from wsss_core.methods import mct as mct_module


def modulation_patch_loop(c2p: torch.Tensor, p2p: torch.Tensor, *, ratio: float = 0.3, alpha: float = 1.2,
                          exclude_self: bool = False, rounding: str = "floor") -> torch.Tensor:
    """Eqs. 3-4 with a loop over patches only: one stable sort of each row, the classes' mean in one call."""
    views, _, tokens = c2p.shape
    count = neighbour_count(tokens, ratio, rounding, exclude_self)
    source, affinity = c2p.numpy(), p2p.numpy()
    out = source.copy()
    for view in range(views):
        for i in range(tokens):
            order = np.argsort(-affinity[view, i], kind="stable")
            order = order[order != i] if exclude_self else order
            out[view, :, i] += alpha * source[view][:, order[:count]].mean(1)
    return torch.from_numpy(out)


def stored_maps(width: int, height: int, classes: int, layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Raw maps as export_cams stores them for one image (2 views, float16 values read back as float32)."""
    rng = np.random.default_rng(seed)
    grid = (height // 16, width // 16)
    tokens = grid[0] * grid[1]
    attention = rng.dirichlet(np.ones(classes + tokens), size=(2, layers, classes + tokens))  # rows sum to 1
    return {"c2p": attention[:, :, :classes, classes:].astype(np.float16).astype(np.float32),
            "p2p": attention[:, :, classes:, classes:].sum(1).astype(np.float16).astype(np.float32),
            "patch_cam": rng.normal(size=(2, classes, *grid)).astype(np.float32)}


def seconds_per_image(refine, repeats: int) -> tuple[float, np.ndarray]:
    """Return (median seconds of one call, its output)."""
    times, output = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        output = refine()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--present", type=int, default=2, help="classes present in the image")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = args.size
    raw = stored_maps(width, height, args.classes, args.layers)
    keys = np.arange(1, args.present + 1)
    method = REGISTRY["semod"]()
    every_class = np.arange(1, args.classes + 1)

    def ours():
        return method.refine(np.zeros((len(keys), height, width), np.float32), keys, raw)

    def all_classes_then_present():  # MCTformer: refine every class, keep the image's (rows keys - 1)
        cams = method.refine(np.zeros((args.classes, height, width), np.float32), every_class, raw)
        return cams[keys - 1]

    fast, expected = seconds_per_image(ours, args.repeats)
    with mock.patch.object(mct_module, "semantic_modulation", semantic_modulation_reference):
        reference, looped = seconds_per_image(all_classes_then_present, max(1, args.repeats // 2))
    with mock.patch.object(mct_module, "semantic_modulation", modulation_patch_loop):
        patch_loop, patch_looped = seconds_per_image(ours, args.repeats)
    tokens = raw["p2p"].shape[-1]
    print(f"semod refine, {width}x{height} image ({tokens} tokens, {args.classes} classes, {len(keys)} present, "
          f"2 views), 1 thread")
    print(f"  ours (present classes, vectorised)        : {fast * 1000:8.1f} ms/image")
    print(f"  reference (all classes, spec's loop)      : {reference * 1000:8.1f} ms/image   "
          f"ratio {reference / fast:6.1f}x   max |difference| {np.abs(expected - looped).max():.1e}")
    print(f"  present classes, loop over patches only   : {patch_loop * 1000:8.1f} ms/image   "
          f"ratio {patch_loop / fast:6.1f}x   max |difference| {np.abs(expected - patch_looped).max():.1e}")


if __name__ == "__main__":
    main()
