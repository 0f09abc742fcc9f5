"""Fully connected CRF (Krähenbühl & Koltun 2011) as PSA/IRN run it.

`dense_crf` is PSA's `crf_inference` (AffinityNet, Ahn & Kwak 2018) with its defaults (CrfParams):
a Gaussian smoothness kernel (sxy 3, compat 3) and a bilateral appearance kernel (sxy 80, srgb 13,
compat 10), 10 mean-field iterations. `crf_on_labels` is IRN's `crf_inference_label`: the unary
comes from a hard label map. Settings come as a `CrfParams` section (its `workers` is not used here).
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from wsss_core.config import CrfParams

PROBABILITY_FLOOR = 1e-5
"""Probabilities are clipped to at least this before -log, so every unary is finite."""


def _describe(array) -> str:
    """Return "dtype [shape]" of an array (for error messages), or the type name of anything else."""
    if not isinstance(array, np.ndarray):
        return type(array).__name__
    return f"{array.dtype} {list(array.shape)}"


def _check_image(image: np.ndarray) -> None:
    """Raise ValueError unless image is uint8 [H, W, 3]."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 [H, W, 3] array, got {_describe(image)}")


def _inference(image: np.ndarray, unary: np.ndarray, settings: CrfParams) -> np.ndarray:
    """Return float32 [C, H, W] marginals for image uint8 [H, W, 3] and unary float32 [C, H*W]."""
    height, width = image.shape[:2]
    n_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb,
                             rgbim=np.require(image, requirements=["C", "W"]),  # pydensecrf rejects read-only
                             compat=settings.bilateral_compat)
    marginals = crf.inference(settings.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(n_labels, height, width)


def dense_crf(image: np.ndarray, probabilities: np.ndarray, settings: CrfParams = CrfParams()) -> np.ndarray:
    """Return float32 [C, H, W] CRF marginals (a distribution per pixel).

    image: uint8 [H, W, 3] RGB; probabilities: float [C, H, W], a distribution over C per pixel.
    """
    _check_image(image)
    if not isinstance(probabilities, np.ndarray) or not np.issubdtype(probabilities.dtype, np.floating) \
            or probabilities.ndim != 3:
        raise ValueError(f"probabilities must be a float [C, H, W] array, got {_describe(probabilities)}")
    if probabilities.shape[1:] != image.shape[:2]:
        raise ValueError(f"probabilities {list(probabilities.shape)} [C, H, W] do not match "
                         f"image {list(image.shape)} [H, W, 3]")
    clipped = np.clip(probabilities, PROBABILITY_FLOOR, 1.0)
    return _inference(image, unary_from_softmax(clipped, clip=None), settings)


def crf_labels(image: np.ndarray, probabilities: np.ndarray, label_ids, settings: CrfParams = CrfParams()
               ) -> np.ndarray:
    """Return uint8 [H, W]: label_ids[argmax over C of dense_crf(image, probabilities)].

    label_ids: [C] class index of each channel, e.g. [0, 3, 15] for background, cat, person.
    """
    label_ids = np.asarray(label_ids).reshape(-1)
    if len(label_ids) != len(probabilities):
        raise ValueError(f"{len(label_ids)} label_ids for {len(probabilities)} probability channels")
    return label_ids.astype(np.uint8)[dense_crf(image, probabilities, settings).argmax(0)]


def crf_on_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, settings: CrfParams = CrfParams(),
                  label_confidence: float = 0.7) -> np.ndarray:
    """Return uint8 [H, W] CRF-smoothed channel labels, as IRN's `crf_inference_label`.

    labels: integer [H, W] in 0..n_labels-1; each pixel's unary puts label_confidence on its label
    and spreads the rest evenly over the others.
    """
    _check_image(image)
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer [H, W] array, got {_describe(labels)}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {list(labels.shape)} [H, W] do not match image {list(image.shape)} [H, W, 3]")
    if n_labels < 2:
        return labels.astype(np.uint8)
    unary = unary_from_labels(labels, n_labels, gt_prob=label_confidence, zero_unsure=False)
    return _inference(image, unary, settings).argmax(0).astype(np.uint8)
