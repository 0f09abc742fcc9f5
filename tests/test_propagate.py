import numpy as np

from wsss_core.affinity.propagate import walked_scores, with_background
from wsss_core.config import RwParams


def test_background_channel_alpha_and_constant_modes():
    cam = np.array([[[0.5, 1.0]], [[0.2, 0.0]]], np.float32)  # [2, 1, 2]
    alpha = with_background(cam, RwParams(bg_mode="alpha", bg_alpha=2.0))
    assert alpha.shape == (3, 1, 2)
    np.testing.assert_allclose(alpha[0], [[0.25, 0.0]])
    np.testing.assert_array_equal(alpha[1:], cam)
    constant = with_background(cam, RwParams(bg_mode="constant", bg_constant=0.39))
    np.testing.assert_allclose(constant[0], [[0.39, 0.39]])


def test_background_of_image_without_classes_is_full():
    scores = with_background(np.zeros((0, 2, 3), np.float32), RwParams(bg_alpha=16.0))
    assert scores.shape == (1, 2, 3) and np.all(scores == 1.0)


def test_scores_after_the_walk_follow_the_background_mode():
    walked = np.array([[[0.2, 0.4]], [[0.8, 0.1]]], np.float32)  # [2, 1, 2]
    # before-walk modes: the walked background is channel 0; everything is divided by the maximum
    np.testing.assert_allclose(walked_scores(walked, RwParams(bg_mode="alpha")), walked / 0.8)
    # IRN: the two CAMs walked alone, divided by their maximum, then the constant background in front
    irn = walked_scores(walked, RwParams(bg_mode="after_walk", bg_constant=0.25))
    assert irn.shape == (3, 1, 2)
    np.testing.assert_allclose(irn[0], [[0.25, 0.25]])
    np.testing.assert_allclose(irn[1:], walked / 0.8)
    np.testing.assert_array_equal(irn.argmax(0), [[2, 1]])
    empty = walked_scores(np.zeros((0, 1, 2), np.float32), RwParams(bg_mode="after_walk", bg_constant=0.25))
    assert empty.shape == (1, 1, 2) and np.all(empty == 0.25)
