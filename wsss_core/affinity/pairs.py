"""Pixel pairs within a radius (PSA/AffinityNet): the 'forward half' of the neighbourhood.

Each unordered pair of pixels closer than `radius` appears exactly once as
(pixel p, pixel p + offset) for one offset below; affinities are stored per offset as
[O, h, w] maps whose entry (o, y, x) is the affinity of (y, x) and (y + dy_o, x + dx_o),
0 where that neighbour falls outside the map.
"""
from __future__ import annotations

import numpy as np


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """Return PSA's half-neighbourhood offsets (dy, dx): dy = 0, dx > 0, or dy > 0, with dy² + dx² < radius².

    radius 5 gives 34 offsets (4 with dy = 0, then 30 for dy = 1..4).
    """
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return offsets


def valid_pair_mask(offsets: list[tuple[int, int]], height: int, width: int, interior_only: bool = False) -> np.ndarray:
    """Return bool [O, h, w]: True where (y, x) + offset lies inside an h x w map.

    interior_only: PSA's released pair set (`get_indices_of_pairs`), which keeps only the sources
    whose every neighbour is inside: rows y < h - r and columns r <= x < w - r, r = radius - 1.
    """
    ys, xs = np.mgrid[0:height, 0:width]
    valid = np.stack([(ys + dy < height) & (xs + dx >= 0) & (xs + dx < width) for dy, dx in offsets])
    if interior_only:
        reach = max(max(dy, abs(dx)) for dy, dx in offsets)
        valid &= ((ys < height - reach) & (xs >= reach) & (xs < width - reach))[None]
    return valid


def shifted(array: np.ndarray, dy: int, dx: int, fill=0) -> np.ndarray:
    """Return array[..., y + dy, x + dx] aligned at (y, x), `fill` where out of bounds (same shape)."""
    height, width = array.shape[-2:]
    out = np.full_like(array, fill)
    src_y = slice(max(dy, 0), height + min(dy, 0))
    dst_y = slice(max(-dy, 0), height - max(dy, 0))
    src_x = slice(max(dx, 0), width + min(dx, 0))
    dst_x = slice(max(-dx, 0), width - max(dx, 0))
    out[..., dst_y, dst_x] = array[..., src_y, src_x]
    return out
