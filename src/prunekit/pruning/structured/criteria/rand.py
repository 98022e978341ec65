"""``random``: uniform random scores from a seeded generator (the baseline every criterion must beat)."""

from __future__ import annotations

from typing import Any

import torch

from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import Criterion, root_channels


@register_criterion("random")
class Random(Criterion):
    """Random scores; reproducible for a given ``seed`` and group order."""

    normalized = True

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return self._checked(group, torch.rand(root_channels(group), generator=self.generator))
