"""``taylor``: first-order Taylor estimate of the loss change when a channel is removed (Molchanov et al. 2019).

``calibrate`` runs labelled batches forward and backward and accumulates ``|w * dL/dw|`` element-wise over the
batches (the per-batch absolute value, not the absolute value of the summed gradient). Scoring then takes the
group L1 norm of these accumulated tensors, reusing torch-pruning's ``GroupMagnitudeImportance(p=1)`` on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import CalibContext, Criterion, accumulate_taylor


@register_criterion("taylor")
class Taylor(Criterion):
    """Accumulated ``|w * grad|`` over labelled calibration batches, summed per channel over the group."""

    needs_data = True
    needs_labels = True

    def __init__(self, group_reduction: str = "mean"):
        self._magnitude = tp.importance.GroupMagnitudeImportance(p=1, group_reduction=group_reduction,
                                                                 normalizer=None)
        self._acc: dict[nn.Parameter, torch.Tensor] = {}
        self.batches = 0

    def calibrate(self, ctx: CalibContext) -> None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        acc, self.batches = accumulate_taylor(ctx.model, params, ctx.batches(), ctx.loss_fn or F.cross_entropy,
                                              "criterion 'taylor'")
        self._acc = dict(zip(params, acc))

    @contextmanager
    def _accumulated_weights(self) -> Iterator[None]:
        """Temporarily put the accumulated |w*g| tensors in place of the weights (restored on exit)."""
        saved = {p: p.data for p in self._acc}
        try:
            for p, acc in self._acc.items():
                p.data = acc.to(p.device)
            yield
        finally:
            for p, data in saved.items():
                p.data = data

    def __call__(self, group: Any) -> torch.Tensor:
        if not self._acc:
            raise PruningError("criterion 'taylor' was not calibrated: call calibrate(ctx) with labelled batches")
        with self._accumulated_weights():
            scores = self._magnitude(group)
        return self._checked(group, scores)
