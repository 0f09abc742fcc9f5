import numpy as np
import pytest

from wsss_core.affinity.affinity_labels import (affinity_pair_labels, downsample_labels, irn_affinity_label_map,
                                                psa_affinity_label_map)
from wsss_core.affinity.pairs import neighbour_offsets

V = 255
LABELS = np.array([[0, 0, 1, V],
                   [0, 2, 1, 1],
                   [V, 0, 2, 1]], dtype=np.uint8)


def pair_set(mask: np.ndarray, radius: int) -> set:
    offsets = neighbour_offsets(radius)
    return {((y, x), (y + offsets[o][0], x + offsets[o][1])) for o, y, x in np.argwhere(mask)}


def test_pair_labels_exact_on_hand_made_map():
    # radius 2: offsets (0, 1), (1, -1), (1, 0), (1, 1); 29 pairs inside the 3 x 4 map, 6 of them touch a 255.
    pairs = affinity_pair_labels(LABELS, 2)
    assert {key: mask.shape for key, mask in pairs.items()} == {key: (4, 3, 4) for key in ("bg_pos", "fg_pos", "neg")}
    assert pair_set(pairs["bg_pos"], 2) == {((0, 0), (0, 1)), ((0, 1), (1, 0)), ((0, 0), (1, 0)), ((1, 0), (2, 1))}
    assert pair_set(pairs["fg_pos"], 2) == {((1, 2), (1, 3)), ((0, 2), (1, 2)), ((1, 3), (2, 3)), ((0, 2), (1, 3)),
                                            ((1, 1), (2, 2)), ((1, 2), (2, 3))}
    assert pair_set(pairs["neg"], 2) == {
        ((0, 1), (0, 2)), ((1, 0), (1, 1)), ((1, 1), (1, 2)), ((2, 1), (2, 2)), ((2, 2), (2, 3)),  # (0, 1)
        ((0, 2), (1, 1)), ((1, 2), (2, 1)), ((1, 3), (2, 2)),  # (1, -1)
        ((0, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (2, 2)),  # (1, 0)
        ((0, 0), (1, 1)), ((0, 1), (1, 2)),  # (1, 1)
    }


def psa_extract_in_radius(label: np.ndarray, radius: int) -> tuple[np.ndarray, ...]:
    """PSA's ExtractAffinityLabelInRadius (crop to pixels whose neighbours are all inside), as [O, h', w'] masks."""
    floor = radius - 1
    crop_h, crop_w = label.shape[0] - floor, label.shape[1] - 2 * floor
    source = label[:-floor, floor:-floor]
    targets = np.stack([label[dy:dy + crop_h, floor + dx:floor + dx + crop_w] for dy, dx in neighbour_offsets(radius)])
    valid = (targets < 255) & (source < 255)
    positive = source == targets
    return positive & (source == 0), positive & (source != 0) & valid, ~positive & valid


@pytest.mark.parametrize("radius", [2, 3, 5])
def test_pair_labels_partition_valid_inside_pairs_and_match_psa_crop(radius):
    rng = np.random.default_rng(radius)
    labels = rng.choice(np.array([0, 1, 2, 3, V], dtype=np.uint8), size=(11, 13))
    pairs = affinity_pair_labels(labels, radius)
    offsets = neighbour_offsets(radius)
    height, width = labels.shape
    expected_valid = np.zeros((len(offsets), height, width), bool)
    for o, (dy, dx) in enumerate(offsets):
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    expected_valid[o, y, x] = labels[y, x] != V and labels[y + dy, x + dx] != V
    bg_pos, fg_pos, neg = pairs["bg_pos"], pairs["fg_pos"], pairs["neg"]
    assert not (bg_pos & fg_pos).any() and not (bg_pos & neg).any() and not (fg_pos & neg).any()
    np.testing.assert_array_equal(bg_pos | fg_pos | neg, expected_valid)
    floor = radius - 1
    for ours, psa in zip((bg_pos, fg_pos, neg), psa_extract_in_radius(labels, radius)):
        np.testing.assert_array_equal(ours[:, :height - floor, floor:width - floor], psa)


# cam [2, 1, 6] for keys (3, 7). Background scores (1 - m)^4 / (1 - m)^32 for the pixel max m:
#   0.95: 6e-6 / 3e-42 -> both foreground -> 3
#   0.02: 0.922 / 0.524 -> both background -> 0
#   0.10: 0.656 / 0.034 -> la background, ha foreground -> 255
#   0.50: 0.0625 / 2e-10 -> both foreground (0.0625 < 0.5) -> 3
#   0.90 (class 7 beats 0.3): -> 7
#   0.25 (class 7): 0.316 / 1e-4 -> la background, ha foreground -> 255
PSA_CAM = np.array([[[0.95, 0.02, 0.10, 0.50, 0.30, 0.20]],
                    [[0.10, 0.00, 0.05, 0.00, 0.90, 0.25]]], dtype=np.float32)
IMAGE = np.zeros((1, 6, 3), np.uint8)


def test_psa_label_map_without_crf():
    labels = psa_affinity_label_map(IMAGE, PSA_CAM, [3, 7])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[3, 0, V, 3, 7, V]])


def test_psa_label_map_hands_normalised_scores_to_crf_and_ha_background_wins():
    calls = []

    def crf(image, probabilities):
        calls.append(probabilities.copy())
        marginals = probabilities.copy()
        if len(calls) == 2:  # the high-alpha map: force background at pixel 0, where la says class 3
            marginals[:, 0, 0] = [1.0, 0.0, 0.0]
        return marginals

    labels = psa_affinity_label_map(IMAGE, PSA_CAM, [3, 7], crf=crf)
    assert len(calls) == 2
    for probabilities in calls:
        assert probabilities.shape == (3, 1, 6)
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(calls[0][0, 0, 3], 0.0625 / (0.0625 + 0.5), rtol=1e-6)
    np.testing.assert_array_equal(labels, [[0, 0, V, 3, 7, V]])


# cam [2, 1, 7] for keys (4, 9); ties with the constant background score go to the background.
IRN_CAM = np.array([[[0.31, 0.30, 0.06, 0.05, 0.00, 0.20, 0.31]],
                    [[0.00, 0.00, 0.00, 0.00, 0.00, 0.50, 0.32]]], dtype=np.float32)
IRN_EXPECTED = [[4, V, V, 0, 0, 9, 9]]


def test_irn_label_map_thresholds():
    labels = irn_affinity_label_map(np.zeros((1, 7, 3), np.uint8), IRN_CAM, [4, 9])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, IRN_EXPECTED)


def test_irn_label_map_passes_channel_labels_to_crf():
    calls = []

    def crf_labels(image, labels, n_labels):
        calls.append((labels.dtype, n_labels, labels.copy()))
        return labels

    image = np.zeros((1, 7, 3), np.uint8)
    np.testing.assert_array_equal(irn_affinity_label_map(image, IRN_CAM, [4, 9], crf_labels=crf_labels), IRN_EXPECTED)
    assert [(dtype, n) for dtype, n, _ in calls] == [(np.uint8, 3)] * 2
    assert {tuple(labels.ravel()) for *_, labels in calls} == {(1, 0, 0, 0, 0, 2, 2), (1, 1, 1, 0, 0, 2, 2)}
    flattened = irn_affinity_label_map(image, IRN_CAM, [4, 9], crf_labels=lambda im, lab, n: np.zeros_like(lab))
    np.testing.assert_array_equal(flattened, np.zeros((1, 7)))


def test_label_maps_without_classes_are_background():
    cam = np.zeros((0, 2, 3), np.float32)
    image = np.zeros((2, 3, 3), np.uint8)
    np.testing.assert_array_equal(psa_affinity_label_map(image, cam, []), np.zeros((2, 3)))
    np.testing.assert_array_equal(irn_affinity_label_map(image, cam, []), np.zeros((2, 3)))


def test_downsample_labels_samples_cell_centres():
    labels = np.arange(30, dtype=np.uint8).reshape(5, 6)
    # stride 2: rows 1, 3 and 4 (the partial cell's centre 5 clipped), columns 1, 3, 5
    np.testing.assert_array_equal(downsample_labels(labels, 2), [[7, 9, 11], [19, 21, 23], [25, 27, 29]])
    # stride 4: rows 2 and 4 (clipped), columns 2 and 5 (clipped)
    np.testing.assert_array_equal(downsample_labels(labels, 4), [[14, 17], [26, 29]])
    assert downsample_labels(np.zeros((17, 24), np.uint8), 8).shape == (3, 3)
    assert downsample_labels(labels, 1).tolist() == labels.tolist()
