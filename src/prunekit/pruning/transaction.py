"""All or nothing: a pruning call either succeeds or leaves the model exactly as it was.

``ModelSnapshot`` records, for every module, the objects it holds (parameters, buffers, child modules, plain
attributes such as ``in_features`` or ``num_heads``, and a copy of a Hugging Face ``config``) and a copy of every
tensor's data. ``restore`` puts the same objects back and their data with them, so after a failed call the module
tree is the same objects and the state dict is bit-identical, whatever the pruning replaced (torch-pruning swaps
parameters for smaller ones), changed in place (compensation, reconstruction) or hooked (statistics).

Example:
    >>> with transaction(model):
    ...     prune_everything(model)   # raises: the model is as it was before the ``with``
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from prunekit.errors import PrunekitError, PruningError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("prunekit_transactions", default=frozenset())


class ModelSnapshot:
    """What ``restore`` needs to put ``model`` back: the module objects' state and a copy of every tensor.

    The copy costs one model's worth of memory (on the tensors' own devices); ``atomic=False`` in
    ``prunekit.prune`` skips it for a model too large to hold twice.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        for m in model.modules():
            attrs = dict(m.__dict__)
            dicts = {k: copy.copy(v) for k, v in attrs.items() if isinstance(v, dict)}  # hooks, params, buffers
            self.modules.append((m, attrs, dicts))
        self.configs = {id(m): copy.deepcopy(m.config) for m in model.modules()
                        if hasattr(getattr(m, "config", None), "to_dict")}  # Hugging Face configs
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        seen: set[int] = set()
        for m in model.modules():
            for t in (*m._parameters.values(), *m._buffers.values()):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    self.tensors.append((t, t.detach().clone(), t.requires_grad))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every module, attribute and tensor back (same objects, bit-identical data)."""
        for m, attrs, dicts in self.modules:
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if k in dicts:  # the same dict object, its old contents (a hook registered since is gone)
                    v.clear()
                    v.update(dicts[k])
                m.__dict__[k] = v
            if id(m) in self.configs:
                m.config.__dict__.clear()
                m.config.__dict__.update(copy.deepcopy(self.configs[id(m)]).__dict__)
        for t, data, requires_grad in self.tensors:
            t.data = data
            if t.is_leaf:
                t.requires_grad_(requires_grad)
            if isinstance(t, nn.Parameter):
                t.grad = None


@contextlib.contextmanager
def transaction(model: nn.Module, what: str = "pruning", enabled: bool = True) -> Iterator[None]:
    """Run the body; on any exception restore ``model`` and raise one typed error that says it is unchanged.

    A ``PrunekitError`` keeps its type (its message gains "the model is unchanged"); any other exception becomes a
    ``PruningError`` naming its type and message, chained to it (``--debug`` / ``__cause__`` has the traceback).
    """
    if not enabled or model in _ACTIVE.get():  # an outer transaction of this model already holds the snapshot
        yield
        return
    snapshot = ModelSnapshot(model)
    token = _ACTIVE.set(_ACTIVE.get() | {model})
    try:
        yield
    except BaseException as e:
        snapshot.restore()
        if isinstance(e, PrunekitError):
            if e.args and isinstance(e.args[0], str) and "model is unchanged" not in e.args[0]:
                e.args = (f"{e.args[0]} (the model is unchanged)", *e.args[1:])
            raise
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: restored, passed on as they are
            raise
        raise PruningError(f"{what} failed and was rolled back, the model is unchanged: {type(e).__name__}: "
                           f"{str(e).strip()[:500]}") from e
    finally:
        _ACTIVE.reset(token)


def transactional(what: str) -> Callable[[F], F]:
    """Make a pruning function whose first argument is the model all or nothing (``transaction``); its keyword
    ``atomic=False`` skips the copy. Nested calls share the outermost snapshot."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(model: nn.Module, *args: Any, atomic: bool = True, **kwargs: Any) -> Any:
            with transaction(model, what, enabled=atomic):
                return fn(model, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
