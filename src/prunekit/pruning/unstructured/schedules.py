"""How sparsity grows: one-shot, iterative in N steps, or gradual on the cubic schedule (Zhu & Gupta 2017).

* oneshot:   prune to the target once, then (optionally) fine-tune with the masks fixed.
* iterative: N steps of (prune, fine-tune); step ``k`` keeps ``(1 - s)^(k/N)`` of the weights, so every step removes
             the same fraction of the weights still there and the last lands exactly on ``s``.
* gradual:   during training, ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3`` for ``t0 <= t <= t1`` (optimizer
             steps), held between mask updates every ``every`` steps; ``s_f`` from ``t1`` on, so the end of training
             recovers at the final sparsity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError

log = logging.getLogger(__name__)
SCHEDULES = ("oneshot", "iterative", "gradual")


def cubic_sparsity(t: int, t0: int, t1: int, final: float, initial: float = 0.0) -> float:
    """Sparsity of the cubic schedule after ``t`` optimizer steps.

    Example:
        >>> cubic_sparsity(50, 0, 100, final=0.8)  # 0.8 + (0 - 0.8) * 0.5**3
        0.7
    """
    if t <= t0:
        return initial
    if t >= t1:
        return final
    return final + (initial - final) * (1.0 - (t - t0) / (t1 - t0)) ** 3


def iterative_targets(final: float, steps: int) -> list[float]:
    """The sparsity after each of ``steps`` iterative steps (geometric in the kept fraction; the last is ``final``).

    Example:
        >>> [round(s, 3) for s in iterative_targets(0.875, 3)]
        [0.5, 0.75, 0.875]
    """
    if steps < 1:
        raise ConfigError(f"--steps {steps}: iterative pruning needs at least 1 step")
    out = [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]
    out[-1] = final
    return out


class GradualSchedule:
    """Training-loop callback: raise the sparsity of a ``Sparsifier`` on the cubic schedule.

    Args:
        sparsifier: the ``Sparsifier`` (its masks, scores and method).
        total_steps: optimizer steps of the whole training phase (epochs x batches per epoch).
        final: the final sparsity ``s_f``.
        initial: ``s_i``, applied before training starts (``start()``); 0 for movement (it has no scores yet).
        start, end: the ramp ``[t0, t1]`` as fractions of ``total_steps``.
        every: optimizer steps between mask updates (default: 20 updates over the ramp).
        recalibrate: called with the model before an epoch's evaluation when masks changed during the epoch
            (BatchNorm re-estimation: running statistics lag a mask update, and an evaluation right after a large
            one reads a model near chance).

    Pass it after the sparsifier in the callbacks: ``fit(..., callbacks=[sp, schedule])``. Because ``fit`` keeps the
    best epoch by accuracy, which may predate the final sparsity, ``on_epoch_end`` keeps the best state among epochs
    at the final sparsity and ``finish()`` restores it.

    Example:
        >>> sched = GradualSchedule(sp, total_steps=epochs * len(train_dl), final=0.9)
        >>> sched.start(); fit(model, train_dl, val_dl, settings, callbacks=[sp, sched]); sched.finish()
    """

    def __init__(self, sparsifier: Any, total_steps: int, final: float, initial: float = 0.0, start: float = 0.0,
                 end: float = 0.75, every: int | None = None, recalibrate: Callable[[nn.Module], Any] | None = None):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"gradual schedule: total_steps={total_steps!r} must be an integer >= 1 (epochs x "
                              "batches per epoch); gradual pruning needs a training phase (--epochs >= 1)")
        if not 0 < final < 1:
            raise ConfigError(f"gradual schedule: sparsity {final} must be in (0, 1): at 0 nothing would be pruned")
        if not 0 <= initial <= final:
            raise ConfigError(f"gradual schedule: need 0 <= initial_sparsity ({initial}) <= sparsity ({final})")
        if not 0 <= start < end <= 1:
            raise ConfigError(f"gradual schedule: need 0 <= start ({start}) < gradual_end ({end}) <= 1 (fractions of "
                              "the training steps)")
        if every is not None and every < 1:
            raise ConfigError(f"--prune-every {every} must be >= 1 (optimizer steps between mask updates)")
        self.sp, self.final, self.initial = sparsifier, float(final), float(initial)
        self.t0 = round(start * total_steps)
        self.t1 = max(self.t0 + 1, round(end * total_steps))
        self.every = every or max(1, math.ceil((self.t1 - self.t0) / 20))
        self.updates = 0
        self.recalibrate, self._changed = recalibrate, False
        self.final_zeros: float | None = None  # sparsity reached at the final update
        self._best: tuple[float, dict[str, torch.Tensor]] | None = None

    def scheduled(self, step: int) -> float:
        """The sparsity for optimizer step ``step``: updated every ``every`` steps of the ramp, and at ``t1``."""
        if step >= self.t1:
            return self.final
        q = self.t0 + ((step - self.t0) // self.every) * self.every if step > self.t0 else step
        return cubic_sparsity(q, self.t0, self.t1, self.final, self.initial)

    def start(self) -> None:
        """Prune to the initial sparsity before training (nothing to do at 0)."""
        if self.initial > 0:
            if self.sp.method.needs == "training":
                raise ConfigError(f"method {self.sp.settings.method!r} has no scores before training: "
                                  "--initial-sparsity must be 0")
            self.sp.step(self.initial)
            self.updates += 1
            if self.initial >= self.final:
                self.final_zeros = self.sp.sparsity()

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        target = self.scheduled(step)
        if target > (self.sp.current or 0.0):
            self.sp.step(target)
            self.updates += 1
            self._changed = True
            if target >= self.final:
                self.final_zeros = self.sp.sparsity()

    def on_before_eval(self, model: nn.Module, epoch: int) -> None:
        if self._changed and self.recalibrate is not None:
            self.recalibrate(model)
        self._changed = False

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        if self.final_zeros is None:
            return
        top1 = float(metrics.get("top1", float("-inf")))
        if self._best is None or top1 > self._best[0]:
            self._best = (top1, {k: v.detach().clone() for k, v in self.sp.model.state_dict().items()})

    def finish(self) -> None:
        """After training: make sure the model is at the final sparsity. ``fit`` restores its best epoch, which may
        predate the final sparsity; then the best epoch at the final sparsity is restored instead."""
        if self.final_zeros is None:
            raise PruningError(f"gradual: training ended before the final sparsity {self.final} was reached "
                               f"(last {self.sp.current}); check total_steps")
        if self.sp.sparsity() >= self.final_zeros - 1e-9:
            return
        if self._best is None:
            raise PruningError("gradual: the model lost its final masks and no epoch at the final sparsity was kept")
        log.warning("gradual: the best epoch came before the final sparsity %.4f was reached; keeping the best epoch "
                    "at the final sparsity instead (top-1 %.2f%%)", self.final, self._best[0])
        self.sp.model.load_state_dict(self._best[1])
