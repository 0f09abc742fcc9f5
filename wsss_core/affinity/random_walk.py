"""PSA's random walk (AffinityNet, Ahn & Kwak, CVPR 2018): propagate CAMs through pixel affinities.

A_beta [N, N] over the N = h * w feature pixels holds aff ** beta for every pixel pair closer than
the radius that lies inside the map (both directions) and 1 on the diagonal (self-loops); no other
entry exists. T = A_beta / A_beta.sum(0) (columns sum to 1) and cams [C, N] become cams @ T^t with
t = 2 ** logt (PSA squares T logt times; logt = 0 is one step of T).

beta = 0 gives weight 1 to every in-radius pair, also one of affinity 0, but never to the pairs
outside the radius: PSA's dense `A ** 0` would set all N x N entries (0 ** 0 = 1); we do not.

The pair set includes the border pairs that PSA's released code omits: PSA (`get_indices_of_pairs`)
takes as sources only the pixels whose every neighbour lies inside the map (rows y < h - r, columns
r <= x < w - r, r = radius - 1), so pixels near the bottom, left and right borders reach fewer
neighbours there. `interior_only=True` (param `rw.pair_set: psa`) restores PSA's set.

`random_walk_dense` is PSA's formula as written; `random_walk` applies the sparse operator t times
(v <- v @ T, as a block-diagonal CSR product over the batch) and never builds an N x N matrix; on
CPU that beat both a stencil of shifted multiply-adds and row-banded batched matmuls (bench/random_walk.py).
"""
from __future__ import annotations

import warnings

import torch

from wsss_core.affinity.pairs import valid_pair_mask


def check_logt(logt: int) -> None:
    """Raise ValueError unless logt >= 0 (t = 2 ** logt >= 1 steps)."""
    if logt < 0:
        raise ValueError(f"logt must be >= 0 (t = 2 ** logt steps), got {logt}")


def pair_indices(offsets: list[tuple[int, int]], height: int, width: int, device: torch.device | str = "cpu",
                 interior_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (index into aff_half.flatten(-3), source pixel, target pixel), each int64 [P], for the in-map pairs.

    Pixels are flat indices y * width + x; target = source + offset.
    """
    valid = torch.from_numpy(valid_pair_mask(offsets, height, width, interior_only)).to(device)
    offset_index, ys, xs = valid.nonzero(as_tuple=True)
    shift = torch.tensor(offsets, dtype=torch.int64, device=device)[offset_index]
    source = ys * width + xs
    target = source + shift[:, 0] * width + shift[:, 1]
    return offset_index * (height * width) + source, source, target


def affinity_matrix_dense(aff_half: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                          interior_only: bool = False) -> torch.Tensor:
    """Return the symmetric A_beta [N, N] from aff_half [O, h, w]: aff ** beta per in-map pair, 1 on the diagonal."""
    _, height, width = aff_half.shape
    half_index, source, target = pair_indices(offsets, height, width, aff_half.device, interior_only)
    weight = aff_half.flatten()[half_index] ** beta
    matrix = torch.eye(height * width, dtype=aff_half.dtype, device=aff_half.device)
    matrix[source, target] = weight
    matrix[target, source] = weight
    return matrix


def transition_matrix_dense(aff_half: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                            interior_only: bool = False) -> torch.Tensor:
    """Return PSA's column-normalised T [N, N] from aff_half [O, h, w] (the reference path)."""
    matrix = affinity_matrix_dense(aff_half, offsets, beta, interior_only)
    return matrix / matrix.sum(0, keepdim=True)


def random_walk_dense(cams: torch.Tensor, aff_half: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                      logt: int, interior_only: bool = False) -> torch.Tensor:
    """Return PSA's cams [C, h, w] @ T^(2^logt), computed by logt squarings of the dense T; [C, h, w]."""
    check_logt(logt)
    transition = transition_matrix_dense(aff_half, offsets, beta, interior_only)
    for _ in range(logt):
        transition = transition @ transition
    return (cams.flatten(1) @ transition).view_as(cams)


def transition_operator(aff_half: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                        interior_only: bool = False) -> torch.Tensor:
    """Return sparse CSR [B*N, B*N]: block-diagonal T^T (A_beta with rows normalised), from aff_half [B, O, h, w].

    v [B*N, C] (pixels major) -> operator @ v is one step v <- v @ T for every image of the batch.
    """
    batch, _, height, width = aff_half.shape
    pixels = height * width
    device = aff_half.device
    half_index, source, target = pair_indices(offsets, height, width, device, interior_only)
    diagonal = torch.arange(pixels, device=device)
    rows = torch.cat([source, target, diagonal])
    cols = torch.cat([target, source, diagonal])
    order = torch.argsort(rows * pixels + cols)
    rows, cols = rows[order], cols[order]

    weight = aff_half.flatten(1)[:, half_index] ** beta  # [B, P]
    values = torch.cat([weight, weight, weight.new_ones(batch, pixels)], 1)[:, order]  # [B, nnz]
    degree = torch.zeros(batch, pixels, dtype=values.dtype, device=device).index_add_(1, rows, values)
    values = values / degree[:, rows]  # T^T[j, i] = A[j, i] / degree[j]

    row_counts = torch.bincount(rows, minlength=pixels).repeat(batch)
    crow = torch.cat([row_counts.new_zeros(1), row_counts.cumsum(0)])
    block_cols = (cols + pixels * torch.arange(batch, device=device)[:, None]).flatten()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, block_cols, values.flatten(), (batch * pixels, batch * pixels),
                                       check_invariants=False)


def random_walk(cams: torch.Tensor, aff_half: torch.Tensor, offsets: list[tuple[int, int]], beta: float,
                logt: int, interior_only: bool = False) -> torch.Tensor:
    """Return cams [B, C, h, w] after 2^logt steps of T from aff_half [B, O, h, w]; [B, C, h, w].

    Equals random_walk_dense per image (in the dtype of aff_half), at O(B * N * O) memory and work per step.
    """
    check_logt(logt)
    batch, channels, height, width = cams.shape
    operator = transition_operator(aff_half, offsets, beta, interior_only)
    scores = cams.to(aff_half.dtype).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    for _ in range(2 ** logt):
        scores = operator @ scores
    return scores.view(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
