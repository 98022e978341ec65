"""``lamp``: layer-adaptive magnitude (Lee et al. 2021): each squared magnitude divided by the sum of the
magnitudes of the channels at least as large in the same layer, so scores compare across layers as they are."""

from __future__ import annotations

import torch_pruning as tp

from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import TPCriterion


@register_criterion("lamp")
class LAMP(TPCriterion):
    """LAMP scores; already normalised per layer (the engine leaves them as they are)."""

    normalized = True

    def __init__(self, p: int = 2, group_reduction: str = "mean"):
        self.tp_importance = tp.importance.LAMPImportance(p=p, group_reduction=group_reduction)
