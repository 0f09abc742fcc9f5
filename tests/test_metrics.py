import numpy as np
import pytest

from wsss_core.metrics import ConfusionMatrix, average_precision, iou_report, mean_average_precision


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
