"""Tiny stand-ins for real networks, for fast tests."""
import torch
from torch import nn

from wsss_core.models.cam_net import CamNet


class TinyBackbone(nn.Module):
    """Two strided convs: [B, 3, H, W] -> [B, 6, ~H/4, ~W/4]; same attributes as models.Backbone."""

    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    output_stride = 4
    channels = 6

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, 2, 1), nn.ReLU())

    def forward(self, images):
        return self.layers(images)


def tiny_cam_net(num_classes: int = 3, seed: int = 0) -> CamNet:
    return CamNet(TinyBackbone(seed), num_classes).eval()
