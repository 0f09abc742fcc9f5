import numpy as np

from wsss_core.config import RwParams
from wsss_core.refine.propagate import with_background


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
