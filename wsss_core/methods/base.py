"""The method interface: how a WSSS method builds its classifier and what its CAM pass returns."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.config import ClsParams
from wsss_core.io import atomic_path


class Method:
    """Base class; each method is a short subclass registered under its `method` name."""

    name: str = ""

    def build_classifier(self, params: ClsParams, num_classes: int) -> nn.Module:
        """Return the classification network trained by `train_cls`."""
        raise NotImplementedError

    def classification_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the scalar training loss for images [B,3,H,W] and multi-hot labels [B,K]."""
        return F.multilabel_soft_margin_loss(model(images), labels)

    def cam_maps(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return maps for CAM export, each [B, K, h, w] and non-negative; 'cam' is required."""
        raise NotImplementedError

    def refine_cams(self, source: Path, destination: Path) -> None:
        """Write the refined CAM store; methods without attention refinement pass the store through.

        The pass-through hard-links the file (no pixel data copied), falling back to a copy.
        """
        with atomic_path(destination) as temporary:
            try:
                os.link(source, temporary)
            except OSError:
                shutil.copyfile(source, temporary)
