"""Pictures people look at: CAM overlays, label colourings, montages."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from wsss_core.data.palette import colorize


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Return uint8 [H, W, 3]: image blended with the 'jet' colouring of heat [H, W] in [0, 1]."""
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255  # [H, W, 3]
    return (image * (1 - alpha) + colours * alpha).astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Return uint8 [H, W, 3]: image blended with the VOC colours of labels [H, W] (0 stays clear)."""
    colours = colorize(labels).astype(np.float32)
    weight = np.where(labels[..., None] == 0, 0.0, alpha)
    return (image * (1 - weight) + colours * weight).astype(np.uint8)


def slice_boxes(image: np.ndarray, boxes: list[tuple[tuple[int, int, int, int], str]]) -> np.ndarray:
    """Return uint8 [H, W, 3]: image with each (y0, x0, y1, x1) box outlined in red and its label written."""
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    for (y0, x0, y1, x1), label in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0), width=2)
        draw.text((x0 + 3, y0 + 2), label, fill=(255, 0, 0))
    return np.asarray(canvas)


def captioned(tile: np.ndarray, caption: str) -> np.ndarray:
    """Return the tile [H, W, 3] with a caption bar of 14 px above it."""
    bar = Image.new("RGB", (tile.shape[1], 14), (255, 255, 255))
    ImageDraw.Draw(bar).text((2, 1), caption, fill=(0, 0, 0))
    return np.concatenate([np.asarray(bar), tile], axis=0)


def hstack(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Return tiles of equal height side by side with white gaps: uint8 [H, sum W + gaps, 3]."""
    height = max(tile.shape[0] for tile in tiles)
    spacer = np.full((height, gap, 3), 255, np.uint8)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    row = [piece for tile in padded for piece in (tile, spacer)][:-1]
    return np.concatenate(row, axis=1)


def vstack(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Return rows stacked top to bottom with white gaps, right-padded to the widest."""
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)[:-gap]


def cam_panel(image: np.ndarray, cam: np.ndarray, keys: np.ndarray, class_names: list[str],
              ground_truth: np.ndarray | None = None, title: str = "image") -> np.ndarray:
    """Return image | one heatmap overlay per class in keys | GT overlay, captioned: uint8 [H', W', 3]."""
    tiles = [captioned(image, title)]
    tiles += [captioned(heatmap_overlay(image, heat), class_names[key]) for heat, key in zip(cam, keys)]
    if ground_truth is not None:
        tiles.append(captioned(label_overlay(image, ground_truth), "ground truth"))
    return hstack(tiles)


def prediction_row(image: np.ndarray, prediction: np.ndarray, ground_truth: np.ndarray | None, title: str
                   ) -> np.ndarray:
    """Return captioned image | prediction overlay | GT overlay (when given): uint8 [H', W', 3]."""
    tiles = [captioned(image, title), captioned(label_overlay(image, prediction), "prediction")]
    if ground_truth is not None:
        tiles.append(captioned(label_overlay(image, ground_truth), "ground truth"))
    return hstack(tiles)


def save_confusion_heatmap(matrix: np.ndarray, class_names: list[str], path) -> None:
    """Write a PNG heatmap of the row-normalised confusion matrix [C, C] (rows: GT, columns: prediction)."""
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    size = 2.5 + 0.35 * len(class_names)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    shown = axes.imshow(normalised, cmap="viridis", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90)
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("prediction")
    axes.set_ylabel("ground truth")
    figure.colorbar(shown, ax=axes, fraction=0.046, label="fraction of GT pixels")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
