"""`semod`: semantic modulation (Li, Su, Cui & Liu, Journal of Software 2025) of MCTformer-V2's attention.

The network, its training and its export are `mct`'s (any MCTformer-V2 checkpoint serves). The
refinement first modulates the class-to-patch attention: each patch adds alpha = 1.2 times the mean
attention of its semantic neighbours, the top 30% of the patches it attends to (spec eqs. 3-4,
vectorised in `refine.attention.semantic_modulation`); then ReLU(CAM) x modulated attention and the
patch-to-patch product as `mct` (eqs. 5-6). With modulation.alpha 0 it is exactly `mct`.
"""
from __future__ import annotations

from wsss_core.methods.base import register_method
from wsss_core.methods.mct import MCTMethod, MCTParams, MCTRefineParams, ModulationParams


class SemodRefineParams(MCTRefineParams):
    modulation: ModulationParams = ModulationParams(enabled=True)


class SemodParams(MCTParams):
    refine: SemodRefineParams = SemodRefineParams()


@register_method
class SemodMethod(MCTMethod):
    name = "semod"
    Params = SemodParams
