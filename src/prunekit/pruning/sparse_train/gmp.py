"""``gmp``: gradual magnitude pruning of whole channels on a cubic schedule (Zhu & Gupta 2017), before pruning.

Structured pre-training zeroes *channels*, not single weights: at each schedule point the channels with the
smallest group magnitude (squared L2 norm over every weight the channel owns, ``channels.py``) are selected
exactly as ``prunekit.prune(criterion="l2", scope=..., max_ratio=..., round_to=...)`` would select them, and their
weights (producer rows, norm scales, consumer columns) are held at zero while the rest of the network trains and
adapts. The masks are the project's one mask mechanism, ``prunekit.pruning.unstructured.masks`` (a ``weight_mask``
buffer per layer, gradient and forward hooks, re-applied after every optimizer step); ``finalize`` folds them (plain
zeros, no buffers) so the model goes on to structured pruning. A channel whose consumer columns are zero no longer
influences anything, so the masked model computes exactly what the physically pruned model will compute (except
where LayerNorm/GroupNorm normalise over the zeroed channels: a transformer's residual stream), and the later
structured prune at ``ratio = sparsity`` removes those channels at no cost. Weight-level GMP (unstructured
sparsity) belongs to ``prunekit.pruning.unstructured``.

Schedule: ``prunekit.pruning.unstructured.schedules.cubic_sparsity``, ``s(t) = s_f (1 - (1 - (t - t0) /
(t1 - t0))^3)`` between ``t0 = start x total_steps`` and ``t1 = end x total_steps``, 0 before, ``s_f`` after; masks
are recomputed every ``every`` steps of the ramp and at ``t1``. Because ``fit`` keeps the best epoch by accuracy,
which may predate the final sparsity, the best epoch at the final sparsity is kept too and ``finalize`` falls back
to it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.sparse_train.base import SparseMethod, register_sparse_method
from prunekit.pruning.sparse_train.channels import unit_channels
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.selection import select
from prunekit.pruning.unstructured.masks import apply_masks, fold_masks, mask_gradients, masked_layers, set_mask
from prunekit.pruning.unstructured.schedules import cubic_sparsity

log = logging.getLogger(__name__)


@register_sparse_method("gmp", help="gradual magnitude pruning of whole channels to `sparsity` on a cubic schedule")
class GMP(SparseMethod):
    """Zero the lowest-magnitude channels progressively, up to ``sparsity`` of the prunable channels.

    Args:
        sparsity: final fraction of the prunable channels zeroed (the ``ratio`` of the prune that follows).
        start, end: the ramp, as fractions of the training steps.
        every: steps between mask updates on the ramp (default: 20 updates over the ramp).
        scope, max_ratio, round_to: channel selection, as in ``prunekit.prune``.

    Example:
        >>> gmp = GMP(sparsity=0.5).attach(model, torch.randn(1, 3, 32, 32), total_steps=1000)
        >>> fit(model, train_loader, val_loader, settings, callbacks=[gmp]); gmp.finalize()
        >>> prunekit.prune(model, x, criterion="l2", ratio=0.5)   # removes exactly the zeroed channels
    """

    default_lam = None

    def __init__(self, lam: float | None = None, *, sparsity: float = 0.5, start: float = 0.0, end: float = 0.75,
                 every: int | None = None, scope: str = "global", max_ratio: float = 0.9, round_to: int | None = None,
                 **targets: Any):
        super().__init__(lam, **targets)
        if not 0 <= sparsity < 1:
            raise ConfigError(f"gmp: sparsity={sparsity!r} must be in [0, 1) (the fraction of prunable channels "
                              "zeroed)")
        if not 0 <= start < end <= 1:
            raise ConfigError(f"gmp: start={start!r}, end={end!r}: need 0 <= start < end <= 1 (fractions of the "
                              "training steps)")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ConfigError(f"gmp: every={every!r} must be an integer >= 1 (steps between mask updates)")
        if scope not in ("global", "local"):
            raise ConfigError(f"gmp: scope={scope!r} is not valid; choose from global, local")
        if not 0 < max_ratio <= 1:
            raise ConfigError(f"gmp: max_ratio={max_ratio!r} must be in (0, 1]")
        if scope == "local" and sparsity > max_ratio:
            raise ConfigError(f"gmp: sparsity={sparsity} cannot be reached with scope='local' and "
                              f"max_ratio={max_ratio}; raise max_ratio or lower sparsity")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ConfigError(f"gmp: round_to={round_to!r} must be an integer >= 1")
        self.sparsity, self.start, self.end, self.every = float(sparsity), start, end, every
        self.scope, self.max_ratio, self.round_to = scope, max_ratio, round_to
        self.current: float | None = None  # sparsity the masks were computed for
        self._best: tuple[float, dict[str, torch.Tensor]] | None = None  # best epoch at the final sparsity
        self.dead: dict[str, torch.Tensor] = {}  # unit name -> (channels,) bool: zeroed channels

    def is_off(self) -> bool:
        return self.sparsity == 0

    def strength(self) -> str:
        return f"sparsity={self.sparsity:g}, scope={self.scope}"

    def setup(self, graph: PruningGraph) -> None:
        if self.total_steps is None:
            raise ConfigError("gmp needs total_steps (epochs x batches per epoch) to lay out its schedule")
        already = masked_layers(graph.model)
        if already:
            raise PruningError(f"gmp: the model already carries unstructured masks ({', '.join(sorted(already)[:3])}"
                               "...); fold them first (fold_masks / --permanent): channels are pruned after them")
        self.channels = [unit_channels(graph, u) for u in self.units]
        normed = [c.name for c in self.channels
                  if any(isinstance(s.module, (nn.LayerNorm, nn.GroupNorm)) for s in c.slices)]
        if normed:
            log.info("gmp: %d groups (%s) are normalised by LayerNorm/GroupNorm over their channels: zeroing a "
                     "channel there only approximates removing it", len(normed), ", ".join(normed[:4]))
        self.t0 = round(self.start * self.total_steps)
        self.t1 = max(self.t0 + 1, round(self.end * self.total_steps))
        self.step_every = self.every or max(1, math.ceil((self.t1 - self.t0) / 20))
        self.update_masks(0.0)  # all-keep masks: the buffers exist before a resumed fit loads its checkpoint
        self.current = None  # the first step selects from the weights (after a resume: the zeroed channels)

    def scheduled(self, step: int) -> float:
        """The sparsity after ``step`` optimizer steps: the cubic schedule of ``prunekit.pruning.unstructured``,
        updated every ``every`` steps of the ramp and at ``t1``."""
        self._require_attached()
        if step >= self.t1:
            return self.sparsity
        q = self.t0 + ((step - self.t0) // self.step_every) * self.step_every if step > self.t0 else step
        return cubic_sparsity(q, self.t0, self.t1, self.sparsity)

    # ------------------------------------------------------------------------------------------ masks
    @torch.no_grad()
    def update_masks(self, sparsity: float) -> int:
        """Select the channels to zero at ``sparsity`` from the current weights and set the masks.

        Returns the number of channels zeroed.
        """
        scores = {}
        for c in self.channels:
            s = c.unit.element_scores(c.sq_norms(weights_only=True).cpu())
            if self.scope == "global":  # as the engine: per-unit mean normalisation before one global ranking
                d = s.mean()
                s = s / d if d > 0 else s
            scores[c.name] = s
        removed = {} if sparsity == 0 else select(self.units, scores, sparsity, self.scope, max_ratio=self.max_ratio,
                                                  round_to=self.round_to).removed
        keep: dict[nn.Module, torch.Tensor] = {}
        self.dead = {}
        for c in self.channels:
            dead = torch.zeros(c.channels, dtype=torch.bool)
            dead[c.unit.channel_indices(removed.get(c.name, []))] = True
            self.dead[c.name] = dead
            for sl, k in c.keep_masks(dead):
                if sl.pname == "weight":  # biases and bare parameters of a channel without consumers do not matter
                    keep[sl.module] = k if sl.module not in keep else keep[sl.module] & k
        for module, k in keep.items():
            set_mask(module, k)
        self.current = sparsity
        return sum(int(d.sum()) for d in self.dead.values())

    # ------------------------------------------------------------------------------------------ callbacks
    def on_before_optimizer_step(self, model: nn.Module, step: int) -> None:
        mask_gradients(model)

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        target = self.scheduled(step)
        if target != self.current:
            n = self.update_masks(target)
            log.debug("gmp step %d: sparsity %.4f, %d channels zeroed", step, target, n)
        apply_masks(model)

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        super().on_epoch_end(model, epoch, metrics)
        if self.current is not None and self.current >= self.sparsity:  # fit keeps the best epoch, maybe an early one
            top1 = float(metrics.get("top1", float("-inf")))
            if self._best is None or top1 > self._best[0]:
                self._best = (top1, {k: v.detach().clone() for k, v in model.state_dict().items()})

    def finalize(self) -> dict[str, float]:
        """Make sure the model is at the final sparsity, fold the masks into plain zeros (biases included) and return
        the metrics. When the training loop restored an epoch from before the final sparsity, the best epoch at the
        final sparsity is restored instead (or, without one, the lowest channels are zeroed now, untrained)."""
        self._require_attached()
        before, n = self.zero_channels(), self.update_masks(self.sparsity)
        if before < n and self._best is not None:
            log.warning("gmp: the weights predate the final sparsity (an earlier best epoch was restored); keeping "
                        "the best epoch at sparsity %g instead (top-1 %.2f%%)", self.sparsity, self._best[0])
            self.model.load_state_dict(self._best[1])
            before, n = self.zero_channels(), self.update_masks(self.sparsity)
        if before < n:
            log.warning("gmp: %d channels zeroed at the end without training (the weights predate the final "
                        "sparsity); train for longer or end the ramp earlier (end=...)", n - before)
        self._best = None
        with torch.no_grad():
            for c in self.channels:
                for sl, k in c.keep_masks(self.dead[c.name]):
                    if sl.pname != "weight":
                        sl.param.mul_(k)
        return super().finalize()

    def detach(self) -> None:
        if self.model is not None:
            fold_masks(self.model)

    @torch.no_grad()
    def zero_channels(self) -> int:
        """Channels whose weights are all exactly zero."""
        return sum(int((c.sq_norms(weights_only=True) == 0).sum()) for c in self.channels)

    def metrics(self) -> dict[str, float]:
        total = sum(c.channels for c in self.channels)
        return {"sparse_target": float(self.current or 0.0), "sparse_zero_channels": self.zero_channels() / total}
