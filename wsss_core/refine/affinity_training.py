"""Training AffinityNet on affinity labels, and computing an image's pair affinities."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss_core.data.dataset import Dataset
from wsss_core.data.palette import VOID, read_label_png
from wsss_core.data.transforms import crop_windows, normalize, resize_long_side
from wsss_core.models.affinity_net import AffinityNet, affinity_loss, pair_affinities
from wsss_core.refine.affinity_labels import affinity_pair_labels, downsample_labels
from wsss_core.refine.pairs import neighbour_offsets
from wsss_core.training import EpochSeededSet, set_poly_lr, sgd_two_groups


def joint_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Return a size x size crop of image [H,W,3] and labels [H,W], padding image with 0 and labels with 255."""
    source, target = crop_windows(*labels.shape, size, rng)
    image_out = np.zeros((size, size, 3), image.dtype)
    labels_out = np.full((size, size), VOID, np.uint8)
    image_out[target] = image[source]
    labels_out[target] = labels[source]
    return image_out, labels_out


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
        long_side = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
        image = resize_long_side(image, long_side)
        labels = np.asarray(resize_long_side(labels, long_side, resample=0))  # nearest
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        image, labels = joint_crop(image, labels, self.crop_size, rng)
        pairs = affinity_pair_labels(downsample_labels(labels, AffinityNet.stride), self.radius)
        masks = [torch.from_numpy(pairs[key].astype(np.float32)) for key in ("bg_pos", "fg_pos", "neg")]
        return (normalize(image, self.mean, self.std), *masks)


def train_affinity_net(model: AffinityNet, train_set: AffinitySet, epochs: int, batch_size: int, lr: float,
                       new_layer_lr_mult: float, weight_decay: float, momentum: float, device: torch.device,
                       seed: int, on_epoch_end: Callable[[int, dict], None] = lambda epoch, parts: None) -> None:
    """Train with SGD (momentum, weight decay) and a poly schedule on PSA's loss bg/4 + fg/4 + neg/2."""
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = sgd_two_groups(*model.parameter_groups(), lr, new_layer_lr_mult, weight_decay, momentum)
    offsets = neighbour_offsets(train_set.radius)
    total, step = epochs * len(loader), 0
    use_amp = device.type == "cuda"
    model.to(device)
    for epoch in range(epochs):
        train_set.epoch = epoch
        model.train()
        sums: dict[str, float] = {}
        bar = tqdm(loader, desc=f"train_affinity epoch {epoch + 1}/{epochs}", unit="batch")
        for images, bg_pos, fg_pos, neg in bar:
            set_poly_lr(optimizer, step, total, 0.9)
            with torch.autocast(device.type, enabled=use_amp):
                features = model(images.to(device))
            affinity = pair_affinities(features.float(), offsets)
            loss, parts = affinity_loss(affinity, bg_pos.to(device), fg_pos.to(device), neg.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        on_epoch_end(epoch + 1, {key: value / len(loader) for key, value in sums.items()})


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
