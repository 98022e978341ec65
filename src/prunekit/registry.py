"""The one Registry used by models, datasets, criteria, methods and schedules.

Example:
    >>> CRITERIA = Registry("criterion")
    >>> @CRITERIA.register("l1")
    ... def l1(...): ...
    >>> CRITERIA.get("l1")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from prunekit.errors import ConfigError, unknown_name_message

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a ``register`` decorator; unknown names raise listing the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register {obj!r} without a name")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, self._items)) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_object(path: str) -> Any:
    """The object named by ``"module.path:Attr.Sub"`` (a dotted attribute path after the colon), imported from
    ``PYTHONPATH``. Raises ``ImportError`` / ``AttributeError`` as Python does; callers turn them into their own
    typed errors."""
    import importlib

    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
