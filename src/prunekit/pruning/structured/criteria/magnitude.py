"""``l1`` and ``l2``: group magnitude of the weights that a channel touches (conv/linear in and out, norms).

Scores are the mean over the group's layers of ``sum |w|^p`` per channel (torch-pruning's
``GroupMagnitudeImportance``); the engine normalises them per layer for global ranking.
"""

from __future__ import annotations

import torch_pruning as tp

from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import TPCriterion


class _Magnitude(TPCriterion):
    p = 1

    def __init__(self, group_reduction: str = "mean", bias: bool = False):
        self.tp_importance = tp.importance.GroupMagnitudeImportance(
            p=self.p, group_reduction=group_reduction, normalizer=None, bias=bias)


@register_criterion("l1")
class L1(_Magnitude):
    """Group L1 norm of the channel's weights."""

    p = 1


@register_criterion("l2")
class L2(_Magnitude):
    """Group squared L2 norm of the channel's weights."""

    p = 2
