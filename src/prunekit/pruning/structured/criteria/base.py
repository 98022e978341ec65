"""The criterion contract: a small ``tp.importance.Importance`` that scores the channels of one group.

A criterion returns one float score per channel of the group's root layer (higher = more important = kept).
Criteria that need data implement ``calibrate(ctx)``; the engine calls it once, before scoring any group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit.batch import split_batch, to_device  # noqa: F401 (re-exported)
from prunekit.errors import PruningError
from prunekit.measure.macs import call_model


@dataclass
class CalibContext:
    """What a criterion may use in ``calibrate``.

    Attributes:
        model: the model being pruned (unpruned while calibrating).
        example_inputs: inputs used to trace the model (a tensor, tuple or dict).
        calib_data: iterable of batches: tensors, ``(x, y)`` tuples/lists or dicts (``labels`` key for targets).
        max_batches: use at most this many batches of ``calib_data`` (``None``: all).
        device: where to run the calibration forward/backward passes.
        stats: per-layer channel statistics keyed by the name of the layer whose output channels they describe
            (filled by the engine with ``stats.collect_stats`` when the criterion ``needs_stats``).
        targets: names of the layers whose output channels may be pruned.
        loss_fn: ``loss_fn(outputs, labels) -> scalar`` for gradient-based criteria (default: cross-entropy).
    """

    model: nn.Module
    example_inputs: Any
    calib_data: Iterable | None = None
    max_batches: int | None = None
    device: str | torch.device = "cpu"
    stats: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def batches(self) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """Yield ``(inputs, labels_or_None)`` on ``device``, at most ``max_batches`` of them."""
        if self.calib_data is None:
            return
        for i, batch in enumerate(self.calib_data):
            if self.max_batches is not None and i >= self.max_batches:
                break
            x, y = split_batch(batch)
            yield to_device(x, self.device), (None if y is None else y.to(self.device))


def accumulate_taylor(model: nn.Module, params: list[torch.Tensor], batches: Iterable[tuple[Any, Any]],
                      loss_fn: Callable[..., torch.Tensor], what: str) -> tuple[list[torch.Tensor], int]:
    """``sum_b |w * dL_b/dw|`` for each of ``params`` over labelled ``(x, y)`` batches (per-batch absolute value),
    the model in eval mode (BN running statistics, no dropout); the parameters' ``.grad`` and the model's mode are
    restored. Returns the float32 sums and the number of batches; ``what`` names the caller in errors."""
    every = [p for p in model.parameters() if p.requires_grad]  # backward fills all of them: all are restored
    saved = [p.grad for p in every]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for x, y in batches:
            if y is None:
                raise PruningError(f"{what} needs labelled calibration batches ((inputs, labels) pairs or dicts "
                                   "with 'labels'); got batches without labels")
            for p in every:
                p.grad = None
            with torch.enable_grad():
                loss_fn(call_model(model, x), y).backward()
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a += (p.detach() * p.grad).abs().float()
            n += 1
    finally:
        for p, g in zip(every, saved):
            p.grad = g
        model.train(was_training)
    if n == 0:
        raise PruningError(f"{what} got no calibration batches; pass calib_data with labelled batches")
    return acc, n


def root_name(group: Any) -> str:
    """Name of the group's root layer (for messages)."""
    module = group[0].dep.target.module
    dg = getattr(group, "_DG", None)
    return dg._module2name.get(module, type(module).__name__) if dg is not None else type(module).__name__


def root_channels(group: Any) -> int:
    return len(group[0].idxs)


class Criterion(tp.importance.Importance):
    """Base of every criterion: one score per channel of a group, higher = kept.

    Class attributes tell the engine what to prepare: ``needs_data`` (calibration batches), ``needs_labels``
    (labelled batches), ``needs_stats`` (``ctx.stats`` filled before ``calibrate``), ``normalized`` (scores are
    already comparable across layers, so the engine does not normalise them per layer for global ranking).
    """

    name: str = ""
    needs_data: bool = False
    needs_labels: bool = False
    needs_stats: bool = False
    normalized: bool = False

    def calibrate(self, ctx: CalibContext) -> None:  # noqa: B027  (optional hook)
        """Gather what scoring needs (gradients, activations...). Default: nothing."""

    def __call__(self, group: Any) -> torch.Tensor:
        raise NotImplementedError

    def _checked(self, group: Any, scores: torch.Tensor | None, why: str = "") -> torch.Tensor:
        """Scores as a float vector with one entry per channel, or a ``PruningError`` naming the layer."""
        n = root_channels(group)
        if scores is None:
            raise PruningError(f"criterion {self.name!r} cannot score the group of layer {root_name(group)!r}"
                               f"{': ' + why if why else ''}; exclude it with ignore=... or choose another criterion")
        scores = scores.detach().float().reshape(-1).cpu()
        if scores.numel() != n:
            raise PruningError(f"criterion {self.name!r} returned {scores.numel()} scores for layer "
                               f"{root_name(group)!r}, which has {n} channels")
        if not torch.isfinite(scores).all():
            raise PruningError(f"criterion {self.name!r} gave non-finite scores for layer {root_name(group)!r}")
        return scores


class TPCriterion(Criterion):
    """A criterion that delegates scoring to a torch-pruning importance (``self.tp_importance``)."""

    tp_importance: tp.importance.Importance
    why_none = "no layer of a type it can score is in the group"

    def __call__(self, group: Any) -> torch.Tensor:
        return self._checked(group, self.tp_importance(group), self.why_none)
