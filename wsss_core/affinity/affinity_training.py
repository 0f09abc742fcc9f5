"""Training AffinityNet on affinity labels."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsss_core.affinity.affinity_labels import affinity_pair_labels, downsample_labels
from wsss_core.affinity.pairs import neighbour_offsets
from wsss_core.config import AffinityParams
from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import read_label_png
from wsss_core.data.transforms import augment_with_labels, normalize
from wsss_core.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss_core.training import EpochSeededSet, fit


class AffinitySet(EpochSeededSet):
    """(image [3,S,S], bg_pos, fg_pos, neg [O, S/8, S/8] float masks) with PSA-style augmentation."""

    def __init__(self, dataset: Dataset, label_dir: Path, recipe: AffinityParams, mean: tuple, std: tuple, seed: int):
        super().__init__(dataset.ids("train"), seed)
        self.dataset, self.label_dir, self.radius = dataset, Path(label_dir), recipe.radius
        self.crop_size, self.resize_long, self.mean, self.std = recipe.crop_size, tuple(recipe.resize_long), mean, std

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        rng = self.sample_rng(index)
        image = self.dataset.read_image(image_id)
        labels = read_label_png(self.label_dir / f"{image_id}.png")
        image, labels = augment_with_labels(image, labels, self.resize_long, self.crop_size, rng)
        pairs = affinity_pair_labels(downsample_labels(labels, AffinityNet.stride), self.radius)
        masks = [torch.from_numpy(pairs[key].astype(np.float32)) for key in ("bg_pos", "fg_pos", "neg")]
        return (normalize(image, self.mean, self.std), *masks)


def train_affinity_net(model: AffinityNet, train_set: AffinitySet, recipe: AffinityParams, *, device: torch.device,
                       seed: int, on_epoch_end: Callable[[int, dict], None] = lambda epoch, parts: None) -> None:
    """Train with the recipe (PSA: SGD, momentum, weight decay, poly) on PSA's loss bg/4 + fg/4 + neg/2."""
    offsets = neighbour_offsets(train_set.radius)

    def batch_loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, bg_pos, fg_pos, neg = batch
        affinity = pair_affinities(model(images).float(), offsets)
        return affinity_loss(affinity, bg_pos, fg_pos, neg)

    fit(model, train_set, batch_loss, recipe=recipe, device=device, seed=seed, desc="train_affinity",
        on_epoch_end=on_epoch_end)
