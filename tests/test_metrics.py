import numpy as np
import pytest

from wsss_core.metrics import (ConfusionMatrix, average_precision, class_map_aucs, iou_report, map_correlations,
                               mean_average_precision, mean_or_none, midranks, roc_auc, trivial_baselines)


def test_confusion_and_iou_on_hand_computed_case():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    prediction = np.array([[0, 1, 1], [1, 2, 0]])
    matrix = ConfusionMatrix(4)
    matrix.update(prediction, target)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    np.testing.assert_array_equal(matrix.matrix, expected)
    iou = matrix.iou()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2: 1; class 3 absent -> NaN
    np.testing.assert_allclose(iou[:3], [0.5, 2 / 3, 1.0])
    assert np.isnan(iou[3])
    assert matrix.miou() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_all_void_image_adds_nothing_and_empty_matrix_is_nan():
    matrix = ConfusionMatrix(3)
    matrix.update(np.zeros((4, 4), int), np.full((4, 4), 255))
    assert matrix.matrix.sum() == 0
    assert np.isnan(matrix.miou())


def test_class_only_in_prediction_counts_as_zero():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([0, 2]), np.array([0, 0]))
    iou = matrix.iou()
    assert iou[0] == 0.5 and iou[2] == 0.0 and np.isnan(iou[1])
    assert matrix.miou() == pytest.approx(0.25)


def test_confusion_equals_loop_reference_on_random_maps():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 17, 13))
    target[rng.random(target.shape) < 0.1] = 255
    prediction = rng.integers(0, 5, target.shape)
    matrix = ConfusionMatrix(5)
    for p, t in zip(prediction, target):
        matrix.update(p, t)
    reference = np.zeros((5, 5), np.int64)
    for p, t in zip(prediction.ravel(), target.ravel()):
        if t != 255:
            reference[t, p] += 1
    np.testing.assert_array_equal(matrix.matrix, reference)


def test_bad_labels_raise():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(np.array([0, 1]), np.array([0]))


def test_average_precision_hand_computed():
    # ranking: pos, neg, pos -> precisions at hits 1/1 and 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    value, per_class = mean_average_precision(scores, targets)
    assert value == 1.0
    assert np.isnan(per_class[2])


def test_iou_report_uses_names_and_none_for_absent():
    report = iou_report(np.array([[2, 0], [0, 0]]), ["background", "cat"])
    assert report == {"miou": 1.0, "per_class": {"background": 1.0, "cat": None}}


def test_trivial_baselines_on_hand_made_masks():
    # image 1 (tag 1): background 2 px, class 1 2 px; image 2 (tags 2, 1): class 2 1 px, class 1 1 px, void 1 px
    masks_and_keys = [(np.array([[0, 0], [1, 1]], np.uint8), [1]), (np.array([[2, 1, 255]], np.uint8), [2, 1])]
    result = trivial_baselines(masks_and_keys, 3)
    # all background: class 0 IoU 2/6, classes 1 and 2 IoU 0 -> mean 1/9
    assert result["all_background"] == pytest.approx((2 / 6 + 0 + 0) / 3)
    # all foreground: image 1 all class 1 (TP 2, FP 2), image 2 all class 2 (TP 1, FP 1) -> bg 0, c1 2/5, c2 1/2
    assert result["all_foreground"] == pytest.approx((0 + 2 / 5 + 1 / 2) / 3)


def test_midranks_share_ties():
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


@pytest.mark.parametrize("positive,negative,expected", [
    ([3, 4], [1, 2], 1.0), ([1, 2], [3, 4], 0.0), ([1, 3], [2, 2], 0.5), ([2], [2], 0.5),
    ([2, 3], [1, 2, 4], 3.5 / 6),  # 2 beats 1, ties 2: 1.5; 3 beats 1 and 2: 2; of 6 pairs
])
def test_roc_auc_hand_computed(positive, negative, expected):
    assert roc_auc(np.array(positive, float), np.array(negative, float)) == pytest.approx(expected)


def test_roc_auc_equals_the_pairwise_count_on_random_scores():
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairs = (positive[:, None] > negative[None]).mean() + 0.5 * (positive[:, None] == negative[None]).mean()
    assert roc_auc(positive, negative) == pytest.approx(pairs)
    assert np.isnan(roc_auc(np.array([]), negative))


def test_class_map_aucs_per_present_class_against_background_only():
    mask = np.array([[0, 0, 1], [2, 2, 255]], np.uint8)
    maps = np.array([[[0.1, 0.2, 0.9], [0.5, 0.5, 0.0]],    # class 1: 0.9 vs background 0.1, 0.2 -> 1.0
                     [[0.3, 0.3, 0.0], [0.3, 0.0, 1.0]]])   # class 2: 0.3, 0.0 vs 0.3, 0.3 -> (0.5 + 0.5 + 0 + 0) / 4
    assert class_map_aucs(maps, [1, 2], mask) == pytest.approx([1.0, 0.25])
    assert class_map_aucs(maps[:1], [3], mask) == []  # class 3 absent from the mask
    assert class_map_aucs(maps, [1, 2], np.ones((2, 3), np.uint8)) == []  # no background pixel


def test_map_correlations_skip_constant_maps():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    b = np.array([[[2.0, 4.0], [6.0, 8.0]], [[0.0, 1.0], [0.0, 1.0]]])
    assert map_correlations(a, b) == pytest.approx([1.0])
    assert map_correlations(a[:1], -a[:1]) == pytest.approx([-1.0])
    assert mean_or_none([float("nan")]) is None and mean_or_none([0.2, 0.4]) == pytest.approx(0.3)
