"""Training and validating a method's multi-label classifier (the network's hooks come as callables)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from wsss_core.config import ClsParams
from wsss_core.data.dataset import Dataset
from wsss_core.data.transforms import TrainAugment, normalize
from wsss_core.metrics import mean_average_precision
from wsss_core.models.groups import TrainingPhase
from wsss_core.training import EpochSeededSet, fit

TrainingLoss = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
ClassScores = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] -> logits [B, K]


class ClassificationSet(EpochSeededSet):
    """{'images': [3, S, S] float, 'labels': multi-hot [K], 'rgb': the crop as uint8 [S, S, 3]}; seeded per (epoch, index)."""

    def __init__(self, dataset: Dataset, split: str, augment: TrainAugment, seed: int):
        super().__init__(dataset.ids(split), seed)
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.ids[index]
        image, rgb = self.augment(self.dataset.read_image(image_id), self.sample_rng(index))
        return {"images": image, "labels": torch.from_numpy(self.dataset.label_vector(image_id)),
                "rgb": torch.from_numpy(rgb)}


@torch.no_grad()
def predict_scores(class_scores: ClassScores, dataset: Dataset, split: str, mean: tuple, std: tuple,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Return (sigmoid scores [N, K], multi-hot targets [N, K]) for whole images of a split."""
    scores, targets = [], []
    for image_id in dataset.ids(split):
        image = normalize(dataset.read_image(image_id), mean, std)[None].to(device)
        scores.append(torch.sigmoid(class_scores(image)).float().cpu().numpy()[0])
        targets.append(dataset.label_vector(image_id))
    return np.stack(scores), np.stack(targets)


def train_classifier(model: nn.Module, training_loss: TrainingLoss, class_scores: ClassScores, dataset: Dataset,
                     recipe: ClsParams, *, device: torch.device, seed: int,
                     on_epoch_end: Callable[[int, dict[str, float]], None] = lambda epoch, values: None,
                     warm_start: TrainingPhase | None = None) -> None:
    """Train `model` on the train split with the recipe; after each epoch report the loss, its parts and val mAP.

    model exposes mean, std and parameter_groups() (recipe.freeze_bn: see training.fit). warm_start: a phase
    trained first, on its own optimizer and schedule cycle; the epochs are numbered through both phases.
    """
    augment = TrainAugment(tuple(recipe.resize_long), recipe.crop_size, model.mean, model.std)
    train_set = ClassificationSet(dataset, "train", augment, seed)

    def validate(epoch: int, means: dict) -> None:
        model.eval()
        val_map = float("nan")
        if dataset.ids("val"):
            val_map = mean_average_precision(*predict_scores(class_scores, dataset, "val", model.mean, model.std,
                                                             device))[0]
        on_epoch_end(epoch, {**means, "val_map": val_map})

    warm_epochs = 0
    if warm_start is not None:
        fit(model, train_set, warm_start.loss, recipe=warm_start.recipe, device=device, seed=seed,
            desc=f"train_cls {warm_start.name}", groups=warm_start.groups, on_epoch_end=validate)
        warm_epochs = warm_start.recipe.epochs
    fit(model, train_set, training_loss, recipe=recipe, device=device, seed=seed, desc="train_cls",
        on_epoch_end=lambda epoch, means: validate(warm_epochs + epoch, means))

