"""`semod` refinement of one image: ours (one top-k and one matrix product for all patches) against the
straightforward reading of the paper's eqs. 3-4 (`refine.attention.semantic_modulation_reference`: for each
patch, sort its patch-to-patch row and average each class's attention over the top 30%), the rest of the
refinement shared, on the same stored maps in one run. Prints the seconds per image of both, the ratio and the largest difference. Run it alone.

    python bench/semod_refine.py                      # a VOC image (500 x 375: 31 x 23 tokens), 20 classes
    python bench/semod_refine.py --size 192 192 --classes 6   # the synthetic default
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
import torch

from wsss_core.methods import REGISTRY
from wsss_core.methods import mct as mct_module
from wsss_core.refine.attention import semantic_modulation_reference


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
    cam = np.zeros((len(keys), height, width), np.float32)

    def refine():
        return method.refine(cam, keys, raw, method.params.refine)

    ours, expected = seconds_per_image(refine, args.repeats)
    with mock.patch.object(mct_module, "semantic_modulation", semantic_modulation_reference):
        loop, looped = seconds_per_image(refine, max(1, args.repeats // 2))
    tokens = raw["p2p"].shape[-1]
    print(f"semod refine, {width}x{height} image ({tokens} tokens, {args.classes} classes, 2 views), 1 thread")
    print(f"  vectorised: {ours * 1000:8.1f} ms/image")
    print(f"  loop      : {loop * 1000:8.1f} ms/image")
    print(f"  ratio     : {loop / ours:8.1f}x   max |difference| {np.abs(expected - looped).max():.2e}")


if __name__ == "__main__":
    main()
