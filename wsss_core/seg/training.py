"""Training a segmentation network on pseudo masks (255 ignored)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.config import SegParams, TrainRecipe
from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import VOID
from wsss_core.data.label_dir import read_label_dir
from wsss_core.data.transforms import augment_with_labels, normalize
from wsss_core.training import EpochSeededSet, fit


class SegmentationSet(EpochSeededSet):
    """(image [3,S,S] float, labels [S,S] int64 with 255 = ignore) from the train split and a label folder."""

    def __init__(self, dataset: Dataset, label_dir: str | Path, recipe: TrainRecipe, mean: tuple, std: tuple, seed: int):
        super().__init__(dataset.ids("train"), seed)
        self.dataset, self.label_dir = dataset, Path(label_dir)
        self.resize_long, self.crop_size, self.mean, self.std = tuple(recipe.resize_long), recipe.crop_size, mean, std

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image, labels = augment_with_labels(self.dataset.read_image(image_id), read_label_dir(self.label_dir, image_id),
                                            self.resize_long, self.crop_size, self.sample_rng(index))
        return normalize(image, self.mean, self.std), torch.from_numpy(labels.astype("int64"))


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over pixels whose label is not 255: logits [B,C,H,W], labels [B,H,W] int64.

    Returns 0 (with a gradient) when a batch has no labelled pixel.
    """
    if not (labels != VOID).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=VOID)


def train_segmenter(model: nn.Module, train_set: SegmentationSet, recipe: SegParams, *, device: torch.device,
                    seed: int, on_epoch_end: Callable[[int, dict], None] = lambda epoch, means: None) -> None:
    """Train with the recipe (DeepLab: SGD, new layers at lr x new_layer_lr_mult, poly) on cross-entropy."""

    def batch_loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        return segmentation_loss(model(images), labels), {}

    fit(model, train_set, batch_loss, recipe=recipe, device=device, seed=seed, desc="train_seg",
        on_epoch_end=on_epoch_end)
