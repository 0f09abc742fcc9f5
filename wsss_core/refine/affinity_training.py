"""Training AffinityNet on affinity labels, and computing an image's pair affinities."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import read_label_png
from wsss_core.data.transforms import augment_with_labels, normalize
from wsss_core.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss_core.refine.affinity_labels import affinity_pair_labels, downsample_labels
from wsss_core.refine.pairs import neighbour_offsets
from wsss_core.training import EpochSeededSet, fit, sgd_two_groups


class AffinitySet(EpochSeededSet):
    """(image [3,S,S], bg_pos, fg_pos, neg [O, S/8, S/8] float masks) with PSA-style augmentation."""

    def __init__(self, dataset: Dataset, label_dir: Path, radius: int, crop_size: int,
                 resize_long: tuple[int, int], mean: tuple, std: tuple, seed: int):
        super().__init__(dataset.ids("train"), seed)
        self.dataset, self.label_dir, self.radius = dataset, Path(label_dir), radius
        self.crop_size, self.resize_long, self.mean, self.std = crop_size, resize_long, mean, std

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        rng = self.sample_rng(index)
        image = self.dataset.read_image(image_id)
        labels = read_label_png(self.label_dir / f"{image_id}.png")
        image, labels = augment_with_labels(image, labels, self.resize_long, self.crop_size, rng)
        pairs = affinity_pair_labels(downsample_labels(labels, AffinityNet.stride), self.radius)
        masks = [torch.from_numpy(pairs[key].astype(np.float32)) for key in ("bg_pos", "fg_pos", "neg")]
        return (normalize(image, self.mean, self.std), *masks)


def train_affinity_net(model: AffinityNet, train_set: AffinitySet, epochs: int, batch_size: int, lr: float,
                       new_layer_lr_mult: float, weight_decay: float, momentum: float, device: torch.device,
                       seed: int, on_epoch_end: Callable[[int, dict], None] = lambda epoch, parts: None) -> None:
    """Train with SGD (momentum, weight decay) and a poly schedule on PSA's loss bg/4 + fg/4 + neg/2."""
    optimizer = sgd_two_groups(*model.parameter_groups(), lr, new_layer_lr_mult, weight_decay, momentum)
    offsets = neighbour_offsets(train_set.radius)

    def batch_loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, bg_pos, fg_pos, neg = batch
        affinity = pair_affinities(model(images).float(), offsets)
        return affinity_loss(affinity, bg_pos, fg_pos, neg)

    fit(model, train_set, batch_loss, optimizer, epochs, batch_size, device, seed, "train_affinity",
        on_epoch_end=on_epoch_end)


@torch.no_grad()
def image_affinities(model: AffinityNet, images: torch.Tensor, radius: int) -> torch.Tensor:
    """Return pair affinities [B, O, ceil(H/8), ceil(W/8)] for normalised images [B, 3, H, W].

    Images are zero-padded on the bottom/right to a multiple of 8 first.
    """
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, (-width) % 8, 0, (-height) % 8))
    with torch.autocast(images.device.type, enabled=images.device.type == "cuda"):
        features = model(padded)
    return pair_affinities(features.float(), neighbour_offsets(radius))
