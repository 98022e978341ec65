"""``bn_scale``: |gamma| of the BatchNorm layers in the group (Network Slimming, Liu et al. 2017)."""

from __future__ import annotations

import torch_pruning as tp

from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import TPCriterion


@register_criterion("bn_scale")
class BNScale(TPCriterion):
    """Mean |gamma| over the group's BatchNorm layers. A group without BatchNorm is an error, not a guess."""

    why_none = "it has no affine BatchNorm layer (bn_scale scores BatchNorm gammas only)"

    def __init__(self, group_reduction: str = "mean"):
        self.tp_importance = tp.importance.BNScaleImportance(group_reduction=group_reduction, normalizer=None)
