"""``fpgm``: filters near the geometric median of their layer are redundant (He et al. 2019).

A channel's score is the sum of distances from its filter to every other filter of the layer: the smallest sum
is the most replaceable filter.
"""

from __future__ import annotations

import torch_pruning as tp

from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import TPCriterion


@register_criterion("fpgm")
class FPGM(TPCriterion):
    """Sum of Euclidean distances to the other filters (conv/linear in and out of the group)."""

    def __init__(self, p: int = 2, group_reduction: str = "mean"):
        self.tp_importance = tp.importance.FPGMImportance(p=p, group_reduction=group_reduction, normalizer=None)
