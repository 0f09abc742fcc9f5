import itertools

import pytest
import torch

from wsss_core.affinity.pairs import neighbour_offsets, valid_pair_mask
from wsss_core.affinity.random_walk import (affinity_matrix_dense, pair_indices, random_walk, random_walk_dense,
                                            transition_matrix_dense, transition_operator)


def random_affinities(batch: int, radius: int, height: int, width: int, seed: int = 0,
                      dtype=torch.float64) -> torch.Tensor:
    """Return aff_half [B, O, h, w] uniform in [0, 1] inside the map, 0 where the neighbour is outside."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.from_numpy(valid_pair_mask(neighbour_offsets(radius), height, width))
    return torch.rand(batch, *valid.shape, generator=generator, dtype=dtype) * valid


def random_cams(batch: int, channels: int, height: int, width: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_dense_transition_is_column_stochastic_over_a_symmetric_affinity_matrix():
    offsets = neighbour_offsets(3)
    aff_half = random_affinities(1, 3, 6, 7)[0]
    affinity = affinity_matrix_dense(aff_half, offsets, beta=8)
    transition = transition_matrix_dense(aff_half, offsets, beta=8)
    torch.testing.assert_close(affinity, affinity.T, rtol=0, atol=0)
    assert torch.equal(affinity.diagonal(), torch.ones(42, dtype=torch.float64))
    assert (transition >= 0).all()
    torch.testing.assert_close(transition.sum(0), torch.ones(42, dtype=torch.float64))
    # self-loops have weight 1, so T's diagonal is 1 / column sum and T / diag(T) gives A back
    torch.testing.assert_close(transition / transition.diagonal()[None], affinity)


def test_dense_transition_matches_a_pair_loop_over_all_pixel_pairs():
    height, width, radius, beta = 3, 4, 2, 2.0
    offsets = neighbour_offsets(radius)
    features = torch.rand(height, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    aff_half = torch.zeros(len(offsets), height, width, dtype=torch.float64)
    for o, (dy, dx) in enumerate(offsets):
        for y, x in itertools.product(range(height), range(width)):
            if 0 <= y + dy < height and 0 <= x + dx < width:
                aff_half[o, y, x] = torch.exp(-(features[y, x] - features[y + dy, x + dx]).abs())

    pixels = [(y, x) for y in range(height) for x in range(width)]
    expected = torch.zeros(12, 12, dtype=torch.float64)
    for i, (yi, xi) in enumerate(pixels):
        for j, (yj, xj) in enumerate(pixels):
            if i == j:
                expected[i, j] = 1
            elif (yi - yj) ** 2 + (xi - xj) ** 2 < radius ** 2:
                expected[i, j] = torch.exp(-(features[yi, xi] - features[yj, xj]).abs()) ** beta
    expected /= expected.sum(0, keepdim=True)
    assert (expected > 0).sum() == 12 + 2 * 29  # self-loops and 29 pairs: 9 horizontal, 8 vertical, 12 diagonal
    torch.testing.assert_close(transition_matrix_dense(aff_half, offsets, beta), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("height, width, radius, beta, logt", [
    (5, 7, 2, 8.0, 8), (8, 6, 3, 1.0, 3), (9, 9, 5, 8.0, 5), (4, 11, 4, 0.0, 2), (6, 5, 3, 8.0, 0), (1, 9, 3, 2.0, 4),
])
def test_fast_random_walk_equals_dense_reference_per_image(height, width, radius, beta, logt):
    offsets = neighbour_offsets(radius)
    aff_half = random_affinities(3, radius, height, width)
    cams = random_cams(3, 4, height, width)
    expected = torch.stack([random_walk_dense(cams[b], aff_half[b], offsets, beta, logt) for b in range(3)])
    torch.testing.assert_close(random_walk(cams, aff_half, offsets, beta, logt), expected, rtol=0, atol=1e-12)


def test_fast_float32_matches_float64_dense_on_a_voc_like_neighbourhood():
    offsets = neighbour_offsets(5)
    aff_half = random_affinities(2, 5, 16, 16, seed=4)
    cams = random_cams(2, 21, 16, 16, seed=5)
    expected = torch.stack([random_walk_dense(cams[b], aff_half[b], offsets, 8.0, 8) for b in range(2)])
    fast = random_walk(cams.float(), aff_half.float(), offsets, 8.0, 8)
    assert fast.dtype == torch.float32
    assert (fast.double() - expected).abs().max() < 1e-5


def test_sparse_operator_is_the_block_diagonal_transposed_transition():
    offsets = neighbour_offsets(3)
    aff_half = random_affinities(2, 3, 5, 6)
    operator = transition_operator(aff_half, offsets, beta=8)
    pairs = int(torch.from_numpy(valid_pair_mask(offsets, 5, 6)).sum())
    assert operator.layout == torch.sparse_csr
    assert operator._nnz() == 2 * (30 + 2 * pairs)
    expected = torch.block_diag(*[transition_matrix_dense(aff_half[b], offsets, 8).T for b in range(2)])
    torch.testing.assert_close(operator.to_dense(), expected, rtol=0, atol=1e-15)


def test_logt_zero_is_one_step_and_logt_one_is_two_steps():
    offsets = neighbour_offsets(3)
    aff_half = random_affinities(1, 3, 5, 6)
    cams = random_cams(1, 2, 5, 6)
    transition = transition_matrix_dense(aff_half[0], offsets, 8)
    one_step = (cams[0].flatten(1) @ transition).view(1, 2, 5, 6)
    torch.testing.assert_close(random_walk(cams, aff_half, offsets, 8, logt=0), one_step)
    torch.testing.assert_close(random_walk_dense(cams[0], aff_half[0], offsets, 8, logt=0), one_step[0])
    two_steps = (cams[0].flatten(1) @ transition @ transition).view(1, 2, 5, 6)
    torch.testing.assert_close(random_walk(cams, aff_half, offsets, 8, logt=1), two_steps)


def test_negative_logt_is_an_error():
    offsets = neighbour_offsets(2)
    aff_half = random_affinities(1, 2, 3, 3)
    cams = random_cams(1, 2, 3, 3)
    with pytest.raises(ValueError, match="logt"):
        random_walk(cams, aff_half, offsets, 8, -1)
    with pytest.raises(ValueError, match="logt"):
        random_walk_dense(cams[0], aff_half[0], offsets, 8, -1)


def test_beta_zero_weighs_every_in_radius_pair_one_and_nothing_outside():
    offsets = neighbour_offsets(2)  # 4-neighbourhood plus diagonals: the 8-neighbourhood
    aff_half = torch.zeros(len(offsets), 3, 3, dtype=torch.float64)
    transition = transition_matrix_dense(aff_half, offsets, beta=0)
    # centre pixel 4 has 8 neighbours and a self-loop: column 4 is 1/9 everywhere
    torch.testing.assert_close(transition[:, 4], torch.full((9,), 1 / 9, dtype=torch.float64))
    # corner pixel 0 has 3 neighbours (1, 3, 4): never the far pixels 2, 5, 6, 7, 8
    torch.testing.assert_close(transition[:, 0], torch.tensor([1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.float64) / 4)


def test_zero_affinities_leave_cams_unchanged():
    offsets = neighbour_offsets(5)
    cams = random_cams(2, 3, 7, 8)
    aff_half = torch.zeros(2, len(offsets), 7, 8, dtype=torch.float64)
    assert torch.equal(random_walk(cams, aff_half, offsets, 8, 3), cams)


def test_affinities_outside_the_map_are_ignored():
    offsets = neighbour_offsets(3)
    aff_half = random_affinities(1, 3, 5, 6)
    garbage = aff_half + torch.rand(aff_half.shape, dtype=torch.float64) * ~torch.from_numpy(
        valid_pair_mask(offsets, 5, 6))
    cams = random_cams(1, 2, 5, 6)
    torch.testing.assert_close(random_walk(cams, garbage, offsets, 8, 3), random_walk(cams, aff_half, offsets, 8, 3))
    torch.testing.assert_close(transition_matrix_dense(garbage[0], offsets, 8),
                               transition_matrix_dense(aff_half[0], offsets, 8))


def test_degree_weighted_mass_is_conserved_and_constants_are_fixed():
    """T's columns sum to 1 and T d = d for the degrees d = A_beta.sum(1): sum_j v_j d_j is invariant."""
    offsets = neighbour_offsets(3)
    aff_half = random_affinities(2, 3, 6, 7)
    cams = random_cams(2, 3, 6, 7)
    walked = random_walk(cams, aff_half, offsets, 8, 4)
    for b in range(2):
        degree = affinity_matrix_dense(aff_half[b], offsets, 8).sum(1).view(6, 7)
        torch.testing.assert_close((walked[b] * degree).sum((1, 2)), (cams[b] * degree).sum((1, 2)))
    constant = torch.full((2, 3, 6, 7), 0.25, dtype=torch.float64)
    torch.testing.assert_close(random_walk(constant, aff_half, offsets, 8, 4), constant)


def test_unit_affinities_mix_to_the_degree_weighted_mean():
    offsets = neighbour_offsets(3)
    valid = torch.from_numpy(valid_pair_mask(offsets, 4, 5)).double()
    cams = random_cams(1, 2, 4, 5)
    walked = random_walk(cams, valid[None], offsets, 8, logt=6)  # |second eigenvalue| = 1/2: error ~ 2^-64
    degree = affinity_matrix_dense(valid, offsets, 8).sum(1).view(4, 5)
    mean = (cams[0] * degree).sum((1, 2)) / degree.sum()
    torch.testing.assert_close(walked[0], mean[:, None, None].expand(2, 4, 5), rtol=0, atol=1e-10)
    assert (cams[0] - mean[:, None, None]).abs().max() > 0.1  # the input was not already mixed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_random_walk_on_cuda_matches_cpu():
    offsets = neighbour_offsets(5)
    aff_half = random_affinities(3, 5, 12, 10, dtype=torch.float32)
    cams = random_cams(3, 21, 12, 10, dtype=torch.float32)
    on_cuda = random_walk(cams.cuda(), aff_half.cuda(), offsets, 8, 8)
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), random_walk(cams, aff_half, offsets, 8, 8), rtol=0, atol=1e-5)


def psa_released_pairs(radius: int, height: int, width: int) -> set[tuple[int, int]]:
    """PSA's get_indices_of_pairs, written out: sources in the crop rows [0, h-r), cols [r, w-r), r = radius-1."""
    reach = radius - 1
    pairs = set()
    for y in range(height - reach):
        for x in range(reach, width - reach):
            for dy, dx in neighbour_offsets(radius):
                pairs.add((y * width + x, (y + dy) * width + x + dx))
    return pairs


@pytest.mark.parametrize("radius, height, width", [(5, 9, 12), (3, 4, 7), (5, 6, 9)])
def test_interior_only_pairs_are_psa_released_set_and_the_default_adds_border_pairs(radius, height, width):
    offsets = neighbour_offsets(radius)
    _, source, target = pair_indices(offsets, height, width, interior_only=True)
    ours = set(zip(source.tolist(), target.tolist()))
    assert ours == psa_released_pairs(radius, height, width)
    _, source, target = pair_indices(offsets, height, width)
    everything = set(zip(source.tolist(), target.tolist()))
    assert ours < everything  # the default keeps the border pairs PSA drops
    aff_half = random_affinities(1, radius, height, width)
    cams = random_cams(1, 3, height, width)
    torch.testing.assert_close(random_walk(cams, aff_half, offsets, 8, 2, interior_only=True)[0],
                               random_walk_dense(cams[0], aff_half[0], offsets, 8, 2, interior_only=True),
                               rtol=1e-6, atol=1e-6)
