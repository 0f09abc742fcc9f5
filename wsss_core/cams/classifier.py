"""Training and validating the multi-label classifier of a method."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from wsss_core.config import ClsParams
from wsss_core.data.dataset import Dataset
from wsss_core.data.transforms import TrainAugment, normalize
from wsss_core.methods.base import Method
from wsss_core.metrics import mean_average_precision
from wsss_core.training import EpochSeededSet, fit, sgd_two_groups


class ClassificationSet(EpochSeededSet):
    """(augmented image [3, S, S], multi-hot labels [K]) pairs; augmentation seeded per (epoch, index)."""

    def __init__(self, dataset: Dataset, split: str, augment: TrainAugment, seed: int):
        super().__init__(dataset.ids(split), seed)
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = self.augment(self.dataset.read_image(image_id), self.sample_rng(index))
        return image, torch.from_numpy(self.dataset.label_vector(image_id))


@dataclass
class EpochResult:
    epoch: int
    loss: float
    val_map: float


@torch.no_grad()
def predict_scores(model: nn.Module, dataset: Dataset, split: str, mean: tuple, std: tuple,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Return (sigmoid scores [N, K], multi-hot targets [N, K]) for whole images of a split."""
    model.eval()
    scores, targets = [], []
    for image_id in dataset.ids(split):
        image = normalize(dataset.read_image(image_id), mean, std)[None].to(device)
        scores.append(torch.sigmoid(model(image)).float().cpu().numpy()[0])
        targets.append(dataset.label_vector(image_id))
    return np.stack(scores), np.stack(targets)


def train_classifier(
    method: Method,
    model: nn.Module,
    dataset: Dataset,
    params: ClsParams,
    device: torch.device,
    seed: int,
    on_epoch_end: Callable[[EpochResult], None] = lambda result: None,
) -> list[EpochResult]:
    """Train `model` with SGD + poly lr on the train split; validate mAP on val after each epoch."""
    mean, std = model.backbone.mean, model.backbone.std
    train_set = ClassificationSet(dataset, "train", TrainAugment(tuple(params.resize_long), params.crop_size, mean, std), seed)
    optimizer = sgd_two_groups(*model.parameter_groups(), params.lr, params.new_layer_lr_mult,
                               params.weight_decay, params.momentum)
    history: list[EpochResult] = []

    def batch_loss(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        return method.classification_loss(model, images, labels), {}

    def validate(epoch: int, means: dict) -> None:
        scores, targets = predict_scores(model, dataset, "val", mean, std, device) if dataset.ids("val") else (None, None)
        val_map = mean_average_precision(scores, targets)[0] if scores is not None else float("nan")
        history.append(EpochResult(epoch, means["loss"], val_map))
        on_epoch_end(history[-1])

    fit(model, train_set, batch_loss, optimizer, params.epochs, params.batch_size, device, seed, "train_cls",
        params.poly_power, validate, num_workers=params.num_workers,
        on_epoch_start=(lambda: freeze_batchnorm(model.backbone)) if params.freeze_bn else lambda: None)
    return history


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode and stop its affine parameters' gradients (IRN's FixedBatchNorm)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
