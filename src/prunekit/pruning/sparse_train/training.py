"""Plugging a sparse method into ``prunekit.train.fit``: a loss wrapper, the callbacks, and the typed settings."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.pruning.sparse_train.base import SPARSE_METHODS, SparseMethod

LossFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (outputs, targets, inputs) -> loss


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, inputs: Any = None) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


class SparseTraining:
    """A sparse method ready for ``fit``: unpacks as ``(loss_fn, callbacks)``.

    ``loss_fn(outputs, targets, inputs) = base_loss(outputs, targets, inputs) + method.penalty()``; ``callbacks``
    holds the method (its ``on_*`` hooks act on weights and gradients). Call ``finalize()`` after training.
    """

    def __init__(self, method: SparseMethod, base_loss: LossFn | None = None):
        self.method = method
        self.base_loss = base_loss or cross_entropy
        self.has_penalty = method.default_lam is not None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: Any = None) -> torch.Tensor:
        loss = self.base_loss(outputs, targets, inputs)
        return loss + self.method.penalty() if self.has_penalty else loss

    @property
    def callbacks(self) -> list[Any]:
        return [self.method]

    def finalize(self) -> dict[str, float]:
        """Detach the method (and, for ``gmp``, zero the final sparsity's channels); returns its metrics."""
        return self.method.finalize()

    def metrics(self) -> dict[str, float]:
        return self.method.metrics()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.loss, self.callbacks))


def make_method(method: str, lam: float | None = None, **options: Any) -> SparseMethod:
    """A new, unattached sparse method; unknown names and options raise ``ConfigError`` listing the valid ones."""
    cls = SPARSE_METHODS.get(method)
    valid = method_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        names = valid if cls.default_lam is None else ["lam", *valid]
        raise ConfigError(f"sparse method {method!r} has no option {unknown[0]!r}; its options are: "
                          f"{', '.join(names)}")
    return cls(lam, **options)


def method_options(cls: type[SparseMethod]) -> list[str]:
    """Keyword options of a method's constructor (besides ``lam``), including the group choice of the base."""
    names = []
    for klass in (cls, SparseMethod):
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    return names


def make_sparse_training(model: nn.Module, method: str, lam: float | None = None, example_inputs: Any = None,
                         total_steps: int | None = None, *, base_loss: LossFn | None = None,
                         **options: Any) -> SparseTraining:
    """Attach sparse method ``method`` to ``model``; returns ``(loss_fn, callbacks)`` for ``prunekit.train.fit``.

    Args:
        model: the model to train (traced once with ``example_inputs`` to find its prunable groups).
        method: ``l1_group``, ``bn_l1``, ``gmp`` or ``variance_concentration`` (``list_sparse_methods()``).
        lam: penalty weight (default: the method's); ``gmp`` has none (its strength is ``sparsity``).
        example_inputs: a tensor, tuple or dict the model accepts.
        total_steps: optimizer steps of the whole training (epochs x batches per epoch); needed by ``gmp``.
        base_loss: the task loss ``(outputs, targets, inputs) -> loss`` (default: cross-entropy).
        **options: method options (``preset``, ``only``, ``ignore``; gmp: ``sparsity``, ``start``, ``end``,
            ``every``, ``scope``, ``max_ratio``, ``round_to``).

    Example:
        >>> st = make_sparse_training(model, "l1_group", 1e-4, torch.randn(1, 3, 32, 32), total_steps=5 * 100)
        >>> loss_fn, callbacks = st
        >>> fit(model, train_loader, val_loader, settings, loss_fn=loss_fn, callbacks=callbacks)
        >>> st.finalize()   # {'sparse_penalty': ..., 'sparse_weak_channels': ...}
    """
    if example_inputs is None:
        raise ConfigError("make_sparse_training needs example_inputs (a batch the model accepts) to find the "
                          "prunable groups")
    m = make_method(method, lam, **options)
    m.attach(model, example_inputs, total_steps)
    return SparseTraining(m, base_loss)


class SparseSettings(Config):
    """Options of sparse pre-training (the ``sparse`` recipe stage and ``prunekit sparse-train``)."""

    method: str = Field("l1_group", description="sparse method: l1_group (group lasso), bn_l1 (network slimming), "
                                                "gmp (gradual magnitude pruning of channels), variance_concentration")
    lam: float | None = Field(None, ge=0, description="penalty weight (default per method: l1_group 1e-4, bn_l1 "
                                                      "1e-4, variance_concentration 0.1; gmp has none)")
    sparsity: float | None = Field(None, ge=0, lt=1, description="gmp: final fraction of prunable channels zeroed "
                                                                 "(default 0.5)")
    gmp_start: float = Field(0.0, ge=0, lt=1, description="gmp: start of the cubic ramp (fraction of training)")
    gmp_end: float = Field(0.75, gt=0, le=1, description="gmp: end of the cubic ramp (fraction of training)")
    gmp_every: int | None = Field(None, ge=1, description="gmp: steps between mask updates (default: 20 updates)")
    scope: Literal["global", "local"] = Field("global", description="gmp: channel selection scope, as in prune")
    max_ratio: float = Field(0.9, gt=0, le=1, description="gmp: no group loses more than this fraction, as in prune")
    round_to: int | None = Field(None, ge=1, description="gmp: kept channels a multiple of this, as in prune")
    preset: str | None = Field(None, description="regularise only these groups: mlp-only or interior (as in prune)")
    only: list[str] = Field(default_factory=list, description="regexes of module names: regularise only these")
    ignore: list[str] = Field(default_factory=list, description="regexes of module names never regularised")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        SPARSE_METHODS.get(v)
        return v

    @model_validator(mode="after")
    def _method_fields(self) -> SparseSettings:
        gmp_fields = {"sparsity", "gmp_start", "gmp_end", "gmp_every", "scope", "max_ratio",
                      "round_to"} & self.model_fields_set
        if self.method != "gmp" and gmp_fields:
            raise ValueError(f"{', '.join(sorted(gmp_fields))} apply to method gmp only (method is {self.method!r})")
        if self.method == "gmp" and self.lam is not None:
            raise ValueError("method gmp has no penalty weight; leave lam unset and set sparsity")
        if self.gmp_start >= self.gmp_end:
            raise ValueError(f"gmp_start {self.gmp_start} must be below gmp_end {self.gmp_end}")
        return self

    def method_kwargs(self) -> dict[str, Any]:
        """``method``, ``lam`` and the options for ``make_sparse_training(model, **kwargs, ...)``."""
        kw: dict[str, Any] = {"method": self.method, "lam": self.lam, "preset": self.preset, "only": self.only,
                              "ignore": self.ignore}
        if self.method == "gmp":
            kw.update(sparsity=0.5 if self.sparsity is None else self.sparsity, start=self.gmp_start,
                      end=self.gmp_end, every=self.gmp_every, scope=self.scope, max_ratio=self.max_ratio,
                      round_to=self.round_to)
        return kw

    def make(self, model: nn.Module, example_inputs: Any, total_steps: int | None,
             base_loss: LossFn | None = None) -> SparseTraining:
        """``make_sparse_training`` with these settings."""
        return make_sparse_training(model, example_inputs=example_inputs, total_steps=total_steps,
                                    base_loss=base_loss, **self.method_kwargs())
