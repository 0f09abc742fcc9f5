import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from wsss_core.config import CrfParams
from wsss_core.crf import crf_labels, crf_on_labels, dense_crf
from wsss_core.pool import run_pool

RED, BLUE = (200, 40, 40), (40, 40, 200)


def softmax_probabilities(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    """Return float32 [C, H, W] random distributions per pixel."""
    logits = rng.normal(scale=2.0, size=(channels, height, width))
    exp = np.exp(logits - logits.max(0))
    return (exp / exp.sum(0)).astype(np.float32)


def two_regions(height: int = 40, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 [H, W, 3]: red left half, blue right half; truth int64 [H, W]: 0 left, 1 right)."""
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2:] = 1
    image = np.where(truth[..., None] == 0, RED, BLUE).astype(np.uint8)
    return image, truth


def noisy_probabilities(truth: np.ndarray, wrong_fraction: float, seed: int = 0) -> np.ndarray:
    """Return float32 [2, H, W]: 0.7 on the true class, but 0.65 on the other class at wrong_fraction of pixels."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(truth.shape) < wrong_fraction
    favoured = np.where(wrong, 1 - truth, truth)
    confidence = np.where(wrong, 0.65, 0.7)
    return np.stack([np.where(favoured == 0, confidence, 1 - confidence),
                     np.where(favoured == 1, confidence, 1 - confidence)]).astype(np.float32)


def psa_crf_inference(img, probs, t=10, scale_factor=1, labels=21):
    """PSA's tool/imutils.py crf_inference, verbatim."""
    h, w = img.shape[:2]
    n_labels = labels
    d = dcrf.DenseCRF2D(w, h, n_labels)
    unary = unary_from_softmax(probs)
    unary = np.ascontiguousarray(unary)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3 / scale_factor, compat=3)
    d.addPairwiseBilateral(sxy=80 / scale_factor, srgb=13, rgbim=np.copy(img), compat=10)
    Q = d.inference(t)
    return np.array(Q).reshape((n_labels, h, w))


def crf_of_seed(seed: int) -> tuple[int, np.ndarray]:
    """Pool job: (seed, dense_crf marginals) of a random image; seed 0's is the largest, so it finishes last."""
    rng = np.random.default_rng(seed)
    height, width = (150, 200) if seed == 0 else (12, 16 + seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return seed, dense_crf(image, softmax_probabilities(rng, 3, height, width))


def test_marginals_are_a_distribution_per_pixel():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    marginals = dense_crf(image, softmax_probabilities(rng, 4, 20, 24).astype(np.float64))
    assert marginals.shape == (4, 20, 24)
    assert marginals.dtype == np.float32
    assert marginals.min() >= 0
    np.testing.assert_allclose(marginals.sum(0), 1.0, atol=1e-5)


def test_matches_psa_crf_inference():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)
    probabilities = softmax_probabilities(rng, 3, 18, 22)
    expected = psa_crf_inference(image, probabilities, labels=3)
    np.testing.assert_allclose(dense_crf(image, probabilities), expected, atol=1e-6)


def test_crf_fixes_noisy_labels_of_flat_regions():
    image, truth = two_regions()
    probabilities = noisy_probabilities(truth, wrong_fraction=0.25)
    before = probabilities.argmax(0) == truth
    after = dense_crf(image, probabilities).argmax(0) == truth
    fixed, broken = np.sum(~before & after), np.sum(before & ~after)
    assert before.mean() < 0.8
    assert fixed >= 0.95 * np.sum(~before)
    assert broken == 0


def test_without_pairwise_terms_argmax_is_unchanged():
    rng = np.random.default_rng(3)
    image, _ = two_regions()
    probabilities = softmax_probabilities(rng, 3, *image.shape[:2])
    settings = CrfParams(gaussian_compat=0.0, bilateral_compat=0.0)
    marginals = dense_crf(image, probabilities, settings)
    np.testing.assert_array_equal(marginals.argmax(0), probabilities.argmax(0))
    assert not np.array_equal(dense_crf(image, probabilities).argmax(0), probabilities.argmax(0))


def test_accepts_read_only_and_strided_images():
    image, truth = two_regions()
    probabilities = noisy_probabilities(truth, wrong_fraction=0.1)
    expected = dense_crf(image, probabilities)
    read_only = image.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(dense_crf(read_only, probabilities), expected)
    bgr = np.ascontiguousarray(image[..., ::-1])
    np.testing.assert_array_equal(dense_crf(bgr[..., ::-1], probabilities), expected)


def test_crf_labels_maps_channels_to_label_ids():
    image, truth = two_regions()
    image[:10] = 0  # a black band on top: a third region
    truth[:10] = 2
    probabilities = np.stack([truth == 2, truth == 0, truth == 1]).astype(np.float32) * 0.8 + 0.2 / 3
    labels = crf_labels(image, probabilities, [0, 3, 15])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.array([3, 15, 0])[truth])
    with pytest.raises(ValueError, match="label_ids"):
        crf_labels(image, probabilities, [0, 3])


def test_crf_on_labels_smooths_a_noisy_label_map():
    image, truth = two_regions()
    noisy = noisy_probabilities(truth, wrong_fraction=0.1).argmax(0).astype(np.uint8)
    assert np.sum(noisy != truth) > 50
    smoothed = crf_on_labels(image, noisy, 2)
    assert smoothed.dtype == np.uint8
    np.testing.assert_array_equal(smoothed, truth)
    np.testing.assert_array_equal(crf_on_labels(image, np.zeros_like(noisy), 1), np.zeros_like(noisy))


@pytest.mark.parametrize("image, probabilities, message", [
    (np.zeros((8, 9, 3), np.uint8), np.full((2, 8, 10), 0.5), "do not match"),
    (np.zeros((8, 9, 3), np.float32), np.full((2, 8, 9), 0.5), "image must be a uint8"),
    (np.zeros((8, 9), np.uint8), np.full((2, 8, 9), 0.5), "image must be a uint8"),
    (np.zeros((8, 9, 3), np.uint8), np.ones((2, 8, 9), np.int64), "probabilities must be a float"),
    (np.zeros((8, 9, 3), np.uint8), np.full((8, 9), 0.5), "probabilities must be a float"),
])
def test_rejects_bad_inputs(image, probabilities, message):
    with pytest.raises(ValueError, match=message):
        dense_crf(image, probabilities)


def test_pool_matches_single_process_in_order():
    seeds = list(range(6))
    single = list(run_pool(crf_of_seed, seeds, workers=1))
    pooled = list(run_pool(crf_of_seed, iter(seeds), workers=2, total=len(seeds)))
    assert [seed for seed, _ in pooled] == seeds
    for (_, expected), (_, actual) in zip(single, pooled, strict=True):
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(ValueError, match="workers"):
        run_pool(crf_of_seed, seeds, workers=-1)


def test_each_label_mode_defaults_to_its_papers_kernel_and_dcrf_can_take_label_unaries():
    from wsss_core.affinity.label_jobs import crf_job
    from wsss_core.config import AffinityParams, DcrfParams

    settings = AffinityParams()
    assert (settings.psa_label_crf.bilateral_sxy, settings.psa_label_crf.bilateral_srgb) == (80.0, 13.0)  # PSA
    assert (settings.irn_label_crf.bilateral_sxy, settings.irn_label_crf.bilateral_srgb) == (50.0, 5.0)  # IRN
    assert settings.irn_label_confidence == 0.7
    image, truth = two_regions()
    scores = noisy_probabilities(truth, 0.2)  # [2, H, W]: background, class 7
    irn = DcrfParams(unary="labels", bilateral_sxy=50.0, bilateral_srgb=5.0)
    _, labels = crf_job(("a", image, scores, np.array([7])), irn)
    expected = np.array([0, 7], np.uint8)[crf_on_labels(image, scores.argmax(0), 2, irn, 0.7)]
    np.testing.assert_array_equal(labels, expected)
    assert (labels == np.where(truth == 1, 7, 0)).mean() > 0.99 > (scores.argmax(0) == truth).mean()
    _, from_scores = crf_job(("a", image, scores, np.array([7])), DcrfParams())
    np.testing.assert_array_equal(from_scores, np.array([0, 7], np.uint8)[dense_crf(image, scores / scores.sum(0)).argmax(0)])


def test_usable_cores_follow_the_affinity_the_cgroup_quota_and_torchrun(tmp_path, monkeypatch):
    from wsss_core.pool import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == 4
    quota.write_text("250000 100000\n")
    assert usable_cores(str(quota)) == 2
    assert usable_cores(str(tmp_path / "none")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert usable_cores(str(tmp_path / "none")) == 1


def fails_on_b(job):
    if job[0] == "b":
        raise ValueError("boom")
    return job[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_stops_the_pool_with_one_line_naming_it(workers):
    from wsss_core.errors import DataError

    jobs = [("a", 1), ("b", 2), ("c", 3)]
    with pytest.raises(DataError, match=r"^dcrf: job 1 \(b\) failed in a worker \(ValueError: boom\)$"):
        list(run_pool(fails_on_b, jobs, workers=workers, total=3))
    assert list(run_pool(fails_on_b, [("a", 1), ("c", 3)], workers=workers)) == ["a", "c"]
