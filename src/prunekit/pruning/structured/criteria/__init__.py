"""Registry of structured pruning criteria. Every module of this package registers itself on import.

Example:
    >>> from prunekit.pruning.structured.criteria import get_criterion, list_criteria
    >>> list_criteria()
    ['bn_scale', 'fpgm', 'l1', 'l2', 'lamp', 'random', 'taylor', ...]
    >>> crit = get_criterion("l1")
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from prunekit.pruning.structured.criteria.base import CalibContext, Criterion, split_batch
from prunekit.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion")


def register_criterion(name: str | None = None, **meta: Any):
    """Register a ``Criterion`` subclass under ``name`` (also set as its ``name`` attribute)."""
    inner = CRITERIA.register(name, **meta)

    def deco(cls: type[Criterion]) -> type[Criterion]:
        cls.name = name or cls.__name__
        return inner(cls)

    return deco


def get_criterion(name: str, **kw: Any) -> Criterion:
    """A new instance of the criterion ``name``; unknown names raise ``ConfigError`` listing the valid ones."""
    crit = CRITERIA.get(name)(**kw)
    crit.name = name
    return crit


def list_criteria() -> list[str]:
    return CRITERIA.names()


for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["CRITERIA", "CalibContext", "Criterion", "get_criterion", "list_criteria", "register_criterion",
           "split_batch"]
