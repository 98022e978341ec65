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
from prunekit.measure import call_model
from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import CalibContext, Criterion


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
        model = ctx.model
        loss_fn = ctx.loss_fn or F.cross_entropy
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        self._acc = {p: torch.zeros_like(p, dtype=torch.float32) for p in params}
        was_training = model.training
        model.eval()  # deterministic: BN running statistics, no dropout
        try:
            for x, y in ctx.batches():
                if y is None:
                    raise PruningError("criterion 'taylor' needs labelled calibration batches ((inputs, labels) "
                                       "pairs or dicts with 'labels'); got batches without labels")
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    loss_fn(call_model(model, x), y).backward()
                for p in params:
                    if p.grad is not None:
                        self._acc[p] += (p.detach() * p.grad).abs().float()
                self.batches += 1
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            model.train(was_training)
        if self.batches == 0:
            raise PruningError("criterion 'taylor' got no calibration batches; pass calib_data with labelled batches")

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
