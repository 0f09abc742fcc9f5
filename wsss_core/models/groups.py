"""Parameter groups: which parameters of a network train alike (lr multiplier, weight decay). Each network
family's `parameter_groups()` returns them; wsss_core.training builds the optimizer from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass
class ParamGroup:
    """Parameters trained alike: lr = recipe lr * lr_mult; weight decay only where weight_decay is True.

    name "backbone", or "<part>_backbone" for a network with several, marks pretrained layers (their BatchNorm is
    what `freeze_bn` freezes).
    """

    name: str
    params: list[nn.Parameter]
    lr_mult: float = 1.0
    weight_decay: bool = True

    @property
    def pretrained(self) -> bool:
        """Whether the group holds pretrained layers (named "backbone" or "<part>_backbone")."""
        return self.name == "backbone" or self.name.endswith("_backbone")


def backbone_and_new_groups(backbone: nn.Module, model: nn.Module, new_layer_lr_mult: float) -> list[ParamGroup]:
    """Return [backbone at lr x1, every other parameter of model at lr x new_layer_lr_mult], all with weight decay."""
    known = {id(p) for p in backbone.parameters()}
    return [ParamGroup("backbone", list(backbone.parameters())),
            ParamGroup("new", [p for p in model.parameters() if id(p) not in known], new_layer_lr_mult)]


@dataclass
class TrainingPhase:
    """A phase trained before the method's own training (a warm start): its name, recipe (epochs, lr, schedule),
    the parameter groups it trains and its loss."""

    name: str
    recipe: object  # a TrainRecipe (wsss_core.config)
    groups: list[ParamGroup]
    loss: Callable  # batch -> (loss, {name: float} parts)
