"""Deterministic synthetic VOC-layout dataset whose classes differ only in a small part.

Every labelled object is a large plain body, drawn from one texture distribution shared by
all classes and only weakly tinted towards its class colour (`body_tint`), carrying a small
distinctive part (about `part_fraction` of the object) whose colour and pattern name the class.
Unlabelled distractor bodies without a part, muted cluttered backgrounds kept away from part and
tinted-body colours, and a "water" band that one class prefers make the body weak and the
context misleading evidence, so a classifier's CAM peaks on the parts and fades into the bodies
(as on real photos), and CAM refinement has the rest of each object to recover. Every image comes from its own numpy Generator seeded with
(seed, split, index), so the same spec always writes the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from wsss_core.data.palette import VOID, write_label_png
from wsss_core.data.sources import SyntheticSpec

# Foreground classes, named after their part's colour; PART_PATTERNS gives each its pattern.
CLASS_NAMES: tuple[str, ...] = ("crimson", "gold", "lime", "magenta", "orange", "cyan", "violet", "ivory")
PART_COLOURS = np.array([
    (200, 20, 50), (235, 190, 20), (120, 230, 30), (225, 40, 200),
    (250, 120, 20), (20, 215, 225), (125, 60, 230), (245, 240, 220),
], dtype=np.float32)  # [len(CLASS_NAMES), 3] RGB
PART_PATTERNS = ("checker", "dots", "crosshatch", "rings", "stripes", "grid", "zigzag", "spokes")
BODY_COLOUR = np.array((128, 112, 96), dtype=np.float32)  # grey-brown, shared by every class
SPLITS = ("train", "val")
WATER_BASE_RATE = 0.15  # P(water band) for images without the water class
REFERENCE_SIZE = 192  # texture periods are in pixels at this image size and scale with it
JPEG_QUALITY = 95
BODY_ANGLES = 360  # samples of a body's boundary radius over a turn
MAX_OVERLAP = 0.08  # at most this fraction of an object may overlap already placed objects
PLACEMENT_TRIES = 40
CLUTTER_MIN_DISTANCE = 80.0  # RGB distance kept between clutter colours and part colours
CLUTTER_BODY_DISTANCE = 60.0  # RGB distance kept between clutter colours and tinted labelled bodies
CLUTTER_MAX_CHROMA = 55.0  # clutter is muted: at most this far per channel from its grey level


@dataclass(frozen=True)
class SyntheticImage:
    """One rendered sample, before JPEG encoding."""

    image: np.ndarray  # uint8 [S, S, 3] RGB
    labels: np.ndarray  # uint8 [S, S]: 0 background (distractors too), 1..K, 255 void band
    instances: np.ndarray  # int16 [S, S]: visible labelled object i+1 (classes[i]), 0 elsewhere
    part_mask: np.ndarray  # bool [S, S]: visible distinctive-part pixels
    classes: tuple[int, ...]  # class (1..K) of each placed labelled object
    has_water: bool


@dataclass
class _Shape:
    """An object rasterised in its own tight box: body and part masks plus their colours."""

    label: int  # 1..K, 0 for a distractor
    mask: np.ndarray  # bool [h, w]: body | part
    part: np.ndarray  # bool [h, w], all False for a distractor
    colours: np.ndarray  # float32 [h, w, 3] body texture with the part painted on


def generate_synthetic(root: Path, spec: SyntheticSpec, progress: bool = True) -> list[str]:
    """Write the VOC-layout dataset under root; return the class names, 'background' first.

    Writes JPEGImages/<id>.jpg, SegmentationClass/<id>.png and
    ImageSets/Segmentation/{train,val}.txt with ids syn_<split>_<index:05d>.
    """
    root = Path(root)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    counts = {"train": spec.n_train, "val": spec.n_val}
    with tqdm(total=sum(counts.values()), desc="synthetic", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            ids = []
            for index in range(counts[split]):
                sample = render_sample(spec, split, index)
                image_id = f"syn_{split}_{index:05d}"
                Image.fromarray(sample.image).save(root / "JPEGImages" / f"{image_id}.jpg",
                                                   quality=JPEG_QUALITY, subsampling=0)
                write_label_png(root / "SegmentationClass" / f"{image_id}.png", sample.labels)
                ids.append(image_id)
                bar.update()
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return ["background", *CLASS_NAMES[:spec.num_classes]]


def render_sample(spec: SyntheticSpec, split: str, index: int) -> SyntheticImage:
    """Render image `index` of `split` exactly as generate_synthetic writes it (before JPEG)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    # The first K train images each carry one class in turn, so every class is trained.
    forced = index % spec.num_classes + 1 if split == "train" and index < spec.num_classes else None
    return render_image(rng, spec, forced_class=forced)


def render_image(rng: np.random.Generator, spec: SyntheticSpec,
                 forced_class: int | None = None) -> SyntheticImage:
    """Render one image with 1..max_objects labelled objects (the first of class forced_class if given).

    Background, layout and pixel noise draw from their own child streams of rng, so a knob that
    changes one (e.g. body_tint, which steers clutter colours) leaves the others as they were.
    """
    size = spec.image_size
    background_rng, layout_rng, noise_rng = rng.spawn(3)
    classes = rng.integers(1, spec.num_classes + 1, size=rng.integers(1, spec.max_objects + 1))
    if forced_class is not None:
        classes[0] = forced_class
    water_chance = spec.water_bias if spec.water_class in classes else WATER_BASE_RATE
    water_level = int(rng.uniform(0.6, 0.75) * size) if rng.random() < water_chance else None
    labels_to_place = [int(c) for c in classes] + [0] * int(rng.integers(0, spec.max_distractors + 1))

    canvas = _background(background_rng, size, water_level, _tinted_body_colours(spec))  # float32 [S, S, 3]
    placed = _place_objects(layout_rng, spec, labels_to_place, water_level)
    labels = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int16)
    part_mask = np.zeros((size, size), bool)
    placed_classes = tuple(shape.label for shape, _ in placed if shape.label)
    is_labelled = np.array([shape.label > 0 for shape, _ in placed])
    instance_numbers = np.cumsum(is_labelled) * is_labelled  # 1.. for labelled objects, 0 for distractors
    for order in layout_rng.permutation(len(placed)):  # later objects are drawn on top
        shape, (top, left) = placed[order]
        mask = shape.mask
        window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
        canvas[window][mask] = shape.colours[mask]
        labels[window][mask] = shape.label
        instances[window][mask] = instance_numbers[order]
        part_mask[window][mask] = shape.part[mask]
    foreground = labels > 0
    labels[_dilate(foreground, spec.void_width) & (labels == 0)] = VOID
    canvas += noise_rng.normal(0.0, 3.0, canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return SyntheticImage(image, labels, instances, part_mask, placed_classes, water_level is not None)


def _place_objects(rng: np.random.Generator, spec: SyntheticSpec, labels: list[int],
                   water_level: int | None) -> list[tuple[_Shape, tuple[int, int]]]:
    """Make and place one shape per label; return (shape, (top, left)) for those that found room.

    A shape may overlap already placed ones by at most MAX_OVERLAP of its area and never touch
    a part, so every part stays visible whatever the drawing order. The first shape always fits.
    Water-class objects sit across the water line when there is water.
    """
    size = spec.image_size
    occupied = np.zeros((size, size), bool)
    parts = np.zeros((size, size), bool)
    placed = []
    for label in labels:
        shape = _make_shape(rng, spec, label)
        height, width = shape.mask.shape
        for _ in range(PLACEMENT_TRIES):
            left = int(rng.integers(0, size - width + 1))
            if water_level is not None and label == spec.water_class:
                centre = water_level + rng.uniform(-0.05, 0.15) * size
                top = int(np.clip(centre - height / 2, 0, size - height))
            else:
                top = int(rng.integers(0, size - height + 1))
            window = (slice(top, top + height), slice(left, left + width))
            overlap = occupied[window] & shape.mask
            fits = (overlap.sum() <= MAX_OVERLAP * shape.mask.sum()
                    and not (overlap & shape.part).any() and not (parts[window] & shape.mask).any())
            if fits:
                occupied[window] |= shape.mask
                parts[window] |= shape.part
                placed.append((shape, (top, left)))
                break
    return placed


def _make_shape(rng: np.random.Generator, spec: SyntheticSpec, label: int) -> _Shape:
    """Draw a body (ellipse, blob or polygon, random size and turn) and, if labelled, its part."""
    size, scale = spec.image_size, spec.image_size / REFERENCE_SIZE
    radius = rng.uniform(0.10, 0.20) * size  # mean radius: diameter 20-40% of the image side
    angles = np.linspace(0, 2 * np.pi, BODY_ANGLES, endpoint=False)
    kind = rng.integers(3)
    if kind == 0:  # ellipse of the same area as the circle of `radius`
        aspect = rng.uniform(1.0, 1.8)
        major, minor = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        boundary = major * minor / np.hypot(minor * np.cos(angles), major * np.sin(angles))
    elif kind == 1:  # rounded blob: a few low harmonics on a circle
        harmonics = np.arange(2, 5)[:, None]
        amplitudes = rng.uniform(0.0, 0.12, (3, 1))
        phases = rng.uniform(0, 2 * np.pi, (3, 1))
        boundary = radius * (1 + (amplitudes * np.cos(harmonics * angles + phases)).sum(0))
    else:  # star-shaped polygon with 5-8 jittered vertices
        boundary = _polygon_boundary(rng, radius, int(rng.integers(5, 9)), angles)
    boundary = np.roll(boundary, int(rng.integers(BODY_ANGLES)))  # random rotation

    half = int(np.ceil(boundary.max() * (1 + 2 * np.sqrt(spec.part_fraction)))) + 2
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)  # [2h+1, 2h+1] px from centre
    theta = np.mod(np.arctan2(y, x), 2 * np.pi)
    body = np.hypot(y, x) <= np.interp(theta, angles, boundary, period=2 * np.pi)
    part = np.zeros_like(body)
    colours = _body_texture(rng, body.shape, scale)
    if label:
        colours = (1 - spec.body_tint) * colours + spec.body_tint * PART_COLOURS[label - 1].astype(np.float32)
        part, part_y, part_x, part_angle = _size_part(rng, spec, body, boundary, angles, y, x)
        u = np.cos(part_angle) * (x - part_x) + np.sin(part_angle) * (y - part_y)
        v = -np.sin(part_angle) * (x - part_x) + np.cos(part_angle) * (y - part_y)
        colours[part] = _part_colours(label, u[part], v[part], scale)
    rows, cols = np.nonzero(body | part)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return _Shape(label, (body | part)[box], part[box], colours[box])


def _polygon_boundary(rng: np.random.Generator, radius: float, corners: int, angles: np.ndarray) -> np.ndarray:
    """Return the boundary radius at `angles` of a star polygon around the origin: float [len(angles)]."""
    corner_angles = np.sort(np.mod(2 * np.pi * (np.arange(corners) + rng.uniform(-0.3, 0.3, corners)) / corners,
                                   2 * np.pi))
    corner_radii = radius * rng.uniform(0.85, 1.2, corners)
    points = np.stack([corner_radii * np.cos(corner_angles), corner_radii * np.sin(corner_angles)], 1)
    unwrapped = np.where(angles < corner_angles[0], angles + 2 * np.pi, angles)
    edge = np.searchsorted(corner_angles, unwrapped, side="right") - 1  # edge from corner i to i+1
    start, end = points[edge], points[(edge + 1) % corners]
    direction = end - start
    ray = np.stack([np.cos(angles), np.sin(angles)], 1)
    return _cross(start, direction) / _cross(ray, direction)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2-D cross products of rows: [n, 2] x [n, 2] -> [n]."""
    return a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]


def _size_part(rng: np.random.Generator, spec: SyntheticSpec, body: np.ndarray, boundary: np.ndarray,
               angles: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """Place a disc or square part inside the body or across its edge, sized to part_fraction.

    Returns (part mask bool like body, centre y, centre x, pattern angle). The size is refined
    on the rasterised masks so that part / (body | part) is close to part_fraction.
    """
    is_square = rng.random() < 0.5
    turn = rng.uniform(0, np.pi / 2)
    direction = rng.uniform(0, 2 * np.pi)
    edge_radius = np.interp(direction, angles, boundary, period=2 * np.pi)
    on_edge = rng.random() < 0.35
    depth = rng.uniform(0.3, 0.6) if on_edge else rng.uniform(0.0, 0.7)
    body_area = body.sum()
    half = np.sqrt(spec.part_fraction * body_area / (4 if is_square else np.pi))  # half side or radius
    for _ in range(3):
        centre = edge_radius - depth * half if on_edge else depth * max(edge_radius - 1.3 * half, 0.0)
        part_y, part_x = centre * np.sin(direction), centre * np.cos(direction)
        u = np.cos(turn) * (x - part_x) + np.sin(turn) * (y - part_y)
        v = -np.sin(turn) * (x - part_x) + np.cos(turn) * (y - part_y)
        part = np.maximum(np.abs(u), np.abs(v)) <= half if is_square else np.hypot(u, v) <= half
        ratio = spec.part_fraction * (body | part).sum() / max(part.sum(), 1)
        half = max(half * np.sqrt(ratio), 1.0)
    return part, part_y, part_x, turn


def _body_texture(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Grey-brown fine stripes plus mottling, one distribution for every body: float32 [h, w, 3]."""
    height, width = shape
    base = BODY_COLOUR * rng.uniform(0.9, 1.1) + rng.normal(0.0, 4.0, 3).astype(np.float32)
    y, x = np.mgrid[:height, :width].astype(np.float32)
    heading, period = rng.uniform(0, np.pi), rng.uniform(3.5, 5.0) * scale
    stripes = np.sin(2 * np.pi * (x * np.cos(heading) + y * np.sin(heading)) / period)
    cells = max(2, round(max(height, width) / (12 * scale)))
    mottle = _smooth_noise(rng, height, width, cells, 1)[..., 0]
    return base + (16 * stripes + 10 * mottle)[..., None].astype(np.float32)


def _part_colours(label: int, u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Class-specific colour and pattern at part coordinates u, v (px from the part centre): float32 [n, 3]."""
    u, v = u / scale, v / scale
    pattern = PART_PATTERNS[label - 1]
    if pattern == "checker":
        lit = (np.floor(u / 3) + np.floor(v / 3)) % 2 == 0
    elif pattern == "dots":
        lit = np.hypot(np.mod(u, 5) - 2.5, np.mod(v, 5) - 2.5) < 1.6
    elif pattern == "crosshatch":
        lit = (np.mod(u + v, 5) < 1.5) | (np.mod(u - v, 5) < 1.5)
    elif pattern == "rings":
        lit = np.mod(np.hypot(u, v), 4) < 2
    elif pattern == "stripes":
        lit = np.mod(u + v, 5) < 2.5
    elif pattern == "grid":
        lit = (np.mod(u, 5) < 1.5) | (np.mod(v, 5) < 1.5)
    elif pattern == "zigzag":
        lit = np.mod(v + 2 * np.abs(np.mod(u, 6) - 3), 5) < 2.5
    else:  # spokes
        lit = np.floor(np.arctan2(v, u) / (np.pi / 6)) % 2 == 0
    colour = PART_COLOURS[label - 1]
    return np.where(lit[:, None], colour, 0.3 * colour)


def _tinted_body_colours(spec: SyntheticSpec) -> np.ndarray:
    """Return the mean colour of each class's tinted body, float32 [K, 3]; [0, 3] without a tint."""
    if spec.body_tint == 0:
        return np.zeros((0, 3), np.float32)
    parts = PART_COLOURS[:spec.num_classes]
    return ((1 - spec.body_tint) * BODY_COLOUR + spec.body_tint * parts).astype(np.float32)


def _background(rng: np.random.Generator, size: int, water_level: int | None, tinted_bodies: np.ndarray
                ) -> np.ndarray:
    """Clutter: a two-colour gradient, smooth colour noise, optional water, blobs and lines: float32 [S, S, 3].

    Clutter colours keep away from part colours and from the tinted body colours [n, 3].
    """
    scale = size / REFERENCE_SIZE
    y, x = np.mgrid[:size, :size].astype(np.float32)
    heading = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(((x - size / 2) * np.cos(heading) + (y - size / 2) * np.sin(heading)) / size + 0.5, 0, 1)
    canvas = _clutter_colour(rng, tinted_bodies) * (1 - ramp[..., None]) + _clutter_colour(rng, tinted_bodies) * ramp[..., None]
    canvas += 18 * _smooth_noise(rng, size, size, int(rng.integers(3, 9)), 3)
    if water_level is not None:
        wavelength, amplitude = rng.uniform(0.3, 0.8) * size, rng.uniform(0.02, 0.05) * size
        water = y >= water_level + amplitude * np.sin(2 * np.pi * x / wavelength + rng.uniform(0, 2 * np.pi))
        ripples = np.sin(2 * np.pi * y / (5 * scale) + 1.5 * np.sin(2 * np.pi * x / (30 * scale)))
        depth = (y - water_level) / size  # darker further down
        water_colour = (np.array((45, 95, 150), np.float32) + rng.normal(0.0, 8.0, 3).astype(np.float32)
                        + (14 * ripples - 40 * depth)[..., None])
        canvas[water] = water_colour[water]
    for _ in range(rng.integers(3, 8)):  # textured ellipses
        centre_x, centre_y = rng.uniform(0, size, 2)
        axes = rng.uniform(0.03, 0.12, 2) * size
        turn = rng.uniform(0, np.pi)
        reach = axes.max()
        box = _box(centre_x - reach, centre_y - reach, centre_x + reach, centre_y + reach, size)
        u = np.cos(turn) * (x[box] - centre_x) + np.sin(turn) * (y[box] - centre_y)
        v = -np.sin(turn) * (x[box] - centre_x) + np.cos(turn) * (y[box] - centre_y)
        blob = (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1
        fill = np.where((np.mod(u, rng.uniform(4, 12) * scale) < 2 * scale)[..., None],
                        _clutter_colour(rng, tinted_bodies), _clutter_colour(rng, tinted_bodies))
        canvas[box][blob] = fill[blob]
    for _ in range(rng.integers(3, 9)):  # straight strokes
        (start_x, start_y), (end_x, end_y) = rng.uniform(0, size, (2, 2))
        half_width = rng.uniform(0.5, 2.0) * scale
        box = _box(min(start_x, end_x) - half_width, min(start_y, end_y) - half_width,
                   max(start_x, end_x) + half_width, max(start_y, end_y) + half_width, size)
        along_x, along_y = end_x - start_x, end_y - start_y
        t = np.clip(((x[box] - start_x) * along_x + (y[box] - start_y) * along_y)
                    / max(along_x ** 2 + along_y ** 2, 1e-6), 0, 1)
        distance = np.hypot(x[box] - start_x - t * along_x, y[box] - start_y - t * along_y)
        canvas[box][distance <= half_width] = _clutter_colour(rng, tinted_bodies)
    return canvas


def _box(left: float, top: float, right: float, bottom: float, size: int) -> tuple[slice, slice]:
    """Return the (rows, cols) slices of an [S, S] image that cover a float box, clipped to the image."""
    rows = slice(max(int(top), 0), min(int(np.ceil(bottom)) + 1, size))
    cols = slice(max(int(left), 0), min(int(np.ceil(right)) + 1, size))
    return rows, cols


def _clutter_colour(rng: np.random.Generator, tinted_bodies: np.ndarray) -> np.ndarray:
    """A random muted RGB colour far from every part colour and every tinted body colour [n, 3]: float32 [3]."""
    for _ in range(30):
        grey = rng.uniform(40, 200)
        colour = np.clip(grey + rng.uniform(-1, 1, 3) * rng.uniform(10, CLUTTER_MAX_CHROMA), 0, 255).astype(np.float32)
        if (np.linalg.norm(PART_COLOURS - colour, axis=1).min() >= CLUTTER_MIN_DISTANCE
                and np.linalg.norm(tinted_bodies - colour, axis=1).min(initial=np.inf) >= CLUTTER_BODY_DISTANCE):
            return colour
    return np.full(3, 50.0, np.float32)  # dark grey: far from parts and tinted bodies


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Gaussian noise on a (cells+1)^2 grid, bilinearly upsampled: float32 [height, width, channels]."""
    grid = rng.standard_normal((cells + 1, cells + 1, channels)).astype(np.float32)
    ys, xs = np.linspace(0, cells, height, dtype=np.float32), np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    columns = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # [cells+1, width, channels]
    return columns[y0] * (1 - fy) + columns[y0 + 1] * fy


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool [H, W] mask by a disc of `radius` px (Euclidean); returns bool [H, W]."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    grown = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if 0 < dy * dy + dx * dx <= radius * radius:
                grown |= padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width]
    return grown
