"""The sparse-method contract and registry.

A sparse method is attached to a model once (``attach``: it finds the prunable groups, the same ones
``prunekit.prune`` would prune with the same ``preset``/``only``/``ignore``), then used by the training loop:
``penalty()`` is added to the task loss after every forward pass; the optional callback methods
``on_before_optimizer_step(model, step)``, ``on_after_optimizer_step(model, step)``,
``on_epoch_end(model, epoch, metrics)`` act on weights and gradients; ``finalize()`` runs after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.graph import PruningGraph, Unit
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import StructuredConfig
from prunekit.registry import Registry

log = logging.getLogger(__name__)

SPARSE_METHODS: Registry[type[SparseMethod]] = Registry("sparse method")


def register_sparse_method(name: str, **meta: Any):
    """Register a ``SparseMethod`` subclass under ``name`` (also set as its ``name`` attribute)."""
    inner = SPARSE_METHODS.register(name, **meta)

    def deco(cls: type[SparseMethod]) -> type[SparseMethod]:
        cls.name = name
        return inner(cls)

    return deco


def list_sparse_methods() -> list[str]:
    return SPARSE_METHODS.names()


def check_lam(method: str, lam: float) -> float:
    """``lam`` as a float; negative or non-finite values are a ``ConfigError`` naming the method."""
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"sparse method {method!r}: lam={lam!r} is not a number; give a penalty weight >= 0, "
                          "e.g. 1e-4") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"sparse method {method!r}: lam={lam!r} is invalid; the penalty weight must be a finite "
                          "number >= 0 (0 turns the penalty off), e.g. 1e-4")
    return value


class SparseMethod:
    """Base of every sparse method.

    Subclasses set ``default_lam`` (``None``: the method has no penalty weight) and implement ``regularizer()``
    (the unweighted penalty, a differentiable scalar) and/or the callback methods.

    Args:
        lam: weight of the penalty added to the task loss (default: the method's ``default_lam``).
        preset, only, ignore: which groups are regularised, exactly as in ``prunekit.prune``.
    """

    name: ClassVar[str] = ""
    default_lam: ClassVar[float | None] = None

    def __init__(self, lam: float | None = None, *, preset: str | None = None, only: Iterable[str] = (),
                 ignore: Iterable[str] = ()):
        if self.default_lam is None:
            if lam is not None:
                raise ConfigError(f"sparse method {self.name!r} has no penalty weight: lam={lam!r} is not used; "
                                  "leave lam unset")
            self.lam = 0.0
        else:
            self.lam = check_lam(self.name, self.default_lam if lam is None else lam)
        self.targets = StructuredConfig.build(dict(preset=preset, only=list(only), ignore=list(ignore)),
                                           source=f"sparse method {self.name!r}")
        self.model: nn.Module | None = None
        self.units: list[Unit] = []
        self.total_steps: int | None = None
        self._last: torch.Tensor | None = None  # last unweighted penalty (detached), for metrics

    # ------------------------------------------------------------------------------------------ lifecycle
    def attach(self, model: nn.Module, example_inputs: Any, total_steps: int | None = None) -> SparseMethod:
        """Find the prunable groups of ``model`` (traced with ``example_inputs``) and prepare the method."""
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ConfigError(f"sparse method {self.name!r}: total_steps={total_steps!r} must be an integer >= 1 "
                              "(epochs x batches per epoch)")
        self.detach()
        graph = PruningGraph(model, example_inputs)
        self.units = plan_units(graph, self.targets)
        self.model, self.total_steps = model, total_steps
        self.setup(graph)
        for u in self.units:
            u.group = None  # drop the dependency graph (and the traced autograd graph it holds)
        if self.is_off():
            log.warning("sparse method %s is off (%s): training will be plain training", self.name, self.strength())
        else:
            log.info("sparse method %s (%s) on %d groups, %d channels", self.name, self.strength(), len(self.units),
                     sum(u.channels for u in self.units))
        return self

    def setup(self, graph: PruningGraph) -> None:  # noqa: B027  (optional hook)
        """Build what the method needs from the graph and ``self.units`` (their groups are still set here)."""

    def detach(self) -> None:  # noqa: B027  (optional hook)
        """Remove hooks; the method stops acting."""

    def finalize(self) -> dict[str, float]:
        """Called once after training: detach and return the final metrics."""
        out = self.metrics()
        self.detach()
        return out

    # ------------------------------------------------------------------------------------------ penalty
    def is_off(self) -> bool:
        return self.default_lam is not None and self.lam == 0

    def strength(self) -> str:
        return f"lam={self.lam:g}"

    def regularizer(self) -> torch.Tensor | None:
        """The unweighted penalty (differentiable scalar), or ``None`` for methods without one."""
        return None

    def penalty(self) -> torch.Tensor:
        """``lam * regularizer()``: add it to the task loss after the forward pass of every training step."""
        self._require_attached()
        if self.default_lam is None:
            return torch.zeros(())
        if self.lam == 0:  # exactly plain training; the value is still measured for the metrics
            with torch.no_grad():
                r = self.regularizer()
            self._last = None if r is None else r.detach()
            return torch.zeros((), device=r.device if r is not None else None)
        r = self.regularizer()
        self._last = r.detach()
        return self.lam * r

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging and writing to ``metrics.json`` (keys prefixed ``sparse_``)."""
        out: dict[str, float] = {}
        if self._last is not None:
            out["sparse_penalty"] = float(self._last)
        return out

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        m = self.metrics()
        if m:
            log.info("sparse %s epoch %d: %s", self.name, epoch,
                     "  ".join(f"{k.removeprefix('sparse_')} {v:.4g}" for k, v in m.items()))

    def _require_attached(self) -> None:
        if self.model is None:
            raise PruningError(f"sparse method {self.name!r} is not attached: call attach(model, example_inputs, "
                               "total_steps) first")
