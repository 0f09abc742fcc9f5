import numpy as np
import pytest
from PIL import Image

from wsss_core.config import parse_params
from wsss_core.data.palette import VOID, read_label_png
from wsss_core.data.sources import MAX_SYNTHETIC_CLASSES, SyntheticSpec
from wsss_core.data.synthetic import CLASS_NAMES, generate_synthetic, render_image
from wsss_core.errors import ParamsError

TINY = SyntheticSpec(n_train=12, n_val=4, image_size=96)


def replace(spec: SyntheticSpec, **change) -> SyntheticSpec:
    """Return spec with `change` applied (validated)."""
    return SyntheticSpec(**{**spec.model_dump(), **change})


def renders(spec: SyntheticSpec, count: int, seed: int = 0):
    """Render `count` images from per-image generators (as generate_synthetic seeds them)."""
    return [render_image(np.random.default_rng([seed, 0, index]), spec) for index in range(count)]


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool mask by a (2r+1)^2 square."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    return np.any([padded[dy:dy + height, dx:dx + width]
                   for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)], axis=0)


def test_same_spec_writes_same_bytes_and_another_seed_differs(tmp_path):
    for name, spec in (("a", TINY), ("b", TINY), ("c", replace(TINY, seed=1))):
        generate_synthetic(tmp_path / name, spec, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 16 + 2
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    for folder in ("JPEGImages", "SegmentationClass"):
        for path in (tmp_path / "a" / folder).iterdir():
            assert path.read_bytes() != (tmp_path / "c" / folder / path.name).read_bytes(), path.name


def test_layout_lists_and_mask_values(tmp_path):
    names = generate_synthetic(tmp_path, TINY, progress=False)
    assert names == ["background", *CLASS_NAMES[:6]]
    lists = tmp_path / "ImageSets" / "Segmentation"
    train = lists.joinpath("train.txt").read_text().splitlines()
    val = lists.joinpath("val.txt").read_text().splitlines()
    assert train == [f"syn_train_{i:05d}" for i in range(12)]
    assert val == [f"syn_val_{i:05d}" for i in range(4)]
    train_classes = set()
    for image_id in train + val:
        with Image.open(tmp_path / "JPEGImages" / f"{image_id}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 96))
        mask = read_label_png(tmp_path / "SegmentationClass" / f"{image_id}.png")
        assert mask.shape == (96, 96)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(7)) | {VOID}
        assert values & set(range(1, 7)), f"{image_id} has no foreground"
        if image_id in train:
            train_classes |= values
    assert set(range(1, 7)) <= train_classes


def test_void_band_lies_around_objects_on_background():
    for sample in renders(TINY, 20):
        labels = sample.labels
        foreground = (labels > 0) & (labels != VOID)
        void = labels == VOID
        assert void.any()
        # No foreground pixel touches background: the band separates them ...
        assert not (grow(foreground, 1) & (labels == 0)).any()
        # ... and the band is only within void_width of some object, never inside one.
        assert not (void & ~grow(foreground, TINY.void_width)).any()
        assert not (void & (sample.instances > 0)).any()
    assert not any((s.labels == VOID).any() for s in renders(replace(TINY, void_width=0), 5))


@pytest.mark.parametrize("fraction", [0.05, 0.10, 0.20])
def test_each_object_has_a_part_of_about_part_fraction(fraction):
    spec = SyntheticSpec(part_fraction=fraction)
    ratios = []
    for sample in renders(spec, 25):
        assert len(sample.classes) >= 1
        for number, label in enumerate(sample.classes, start=1):
            obj = sample.instances == number
            assert (sample.labels[obj] == label).all()
            ratios.append((obj & sample.part_mask).sum() / obj.sum())
    ratios = np.array(ratios)
    assert len(ratios) >= 25
    assert abs(np.median(ratios) - fraction) < 0.05 * fraction
    assert ((ratios > 0.85 * fraction) & (ratios < 1.2 * fraction)).all()


def test_body_look_is_class_independent_and_parts_are_not():
    spec = SyntheticSpec(image_size=128, num_classes=8, body_tint=0.0)  # the tint is the only class cue in bodies
    body_pixels = {label: [] for label in range(1, 9)}
    part_pixels = {label: [] for label in range(1, 9)}
    for sample in renders(spec, 120):
        for number, label in enumerate(sample.classes, start=1):
            obj = sample.instances == number
            body_pixels[label].append(sample.image[obj & ~sample.part_mask])
            part_pixels[label].append(sample.image[obj & sample.part_mask])
    body_means = np.array([np.concatenate(body_pixels[k]).mean(0) for k in range(1, 9)])  # [8, 3]
    part_means = np.array([np.concatenate(part_pixels[k]).mean(0) for k in range(1, 9)])  # [8, 3]
    body_stds = np.array([np.concatenate(body_pixels[k]).std(0) for k in range(1, 9)])  # [8, 3]
    assert np.ptp(body_means, axis=0).max() < 8.0
    assert np.ptp(body_stds, axis=0).max() < 3.0
    part_gaps = np.linalg.norm(part_means[:, None] - part_means[None], axis=-1)[np.triu_indices(8, 1)]
    assert part_gaps.min() > 35.0
    assert np.linalg.norm(part_means - body_means.mean(0), axis=1).min() > 40.0


def test_body_tint_moves_labelled_bodies_towards_their_part_colour_only():
    from wsss_core.data.synthetic import PART_COLOURS

    plain, tinted = renders(replace(TINY, body_tint=0.0), 6), renders(replace(TINY, body_tint=0.5), 6)
    for before, after in zip(plain, tinted):
        np.testing.assert_array_equal(before.labels, after.labels)  # same layout: tint steers the background only
        for number, label in enumerate(before.classes, start=1):
            body = (before.instances == number) & ~before.part_mask
            expected = 0.5 * before.image[body].mean(0) + 0.5 * PART_COLOURS[label - 1]
            np.testing.assert_allclose(after.image[body].mean(0), expected, atol=3.0)
        parts = before.part_mask
        np.testing.assert_array_equal(before.image[parts], after.image[parts])


def test_clutter_colours_keep_away_from_parts_and_tinted_bodies():
    from wsss_core.data.synthetic import (CLUTTER_BODY_DISTANCE, CLUTTER_MIN_DISTANCE, PART_COLOURS,
                                          _clutter_colour, _tinted_body_colours)

    tinted = _tinted_body_colours(TINY)
    assert tinted.shape == (TINY.num_classes, 3)
    rng = np.random.default_rng(0)
    colours = np.array([_clutter_colour(rng, tinted) for _ in range(500)])  # [500, 3]
    assert np.linalg.norm(colours[:, None] - PART_COLOURS[None], axis=-1).min() >= CLUTTER_MIN_DISTANCE
    assert np.linalg.norm(colours[:, None] - tinted[None], axis=-1).min() >= CLUTTER_BODY_DISTANCE
    assert len(np.unique(colours, axis=0)) > 450  # still varied
    assert _tinted_body_colours(replace(TINY, body_tint=0.0)).shape == (0, 3)


def test_water_class_comes_with_the_water_band():
    spec = SyntheticSpec(image_size=64, n_train=8)
    samples = renders(spec, 300)
    with_class = [s.has_water for s in samples if spec.water_class in s.classes]
    without = [s.has_water for s in samples if spec.water_class not in s.classes]
    assert len(with_class) > 50 and len(without) > 100
    assert np.mean(with_class) > 0.65 and np.mean(without) < 0.25
    bottom = np.array([s.image[-4:].reshape(-1, 3).mean(0) for s in samples if s.has_water])  # [n, 3]
    top = np.array([s.image[:4].reshape(-1, 3).mean(0) for s in samples if s.has_water])  # [n, 3]
    assert bottom[:, 2].mean() > bottom[:, 0].mean() + 40  # blue-ish water at the bottom
    assert top[:, 2].mean() < top[:, 0].mean() + 20
    no_bias = renders(replace(spec, water_class=0), 300)
    assert abs(np.mean([s.has_water for s in no_bias]) - 0.15) < 0.07


def test_the_section_bounds_the_classes_by_the_generator_s_names():
    assert MAX_SYNTHETIC_CLASSES == len(CLASS_NAMES)


@pytest.mark.parametrize("change", [{"num_classes": 4}, {"num_classes": 9}, {"water_class": 7},
                                    {"part_fraction": 0.0}, {"n_train": 3}, {"max_distractors": -1}])
def test_bad_spec_is_a_params_error_naming_the_section(change):
    with pytest.raises(ParamsError, match=r"data\.synthetic"):
        parse_params({"data": {"synthetic": change}}, {})
