"""Guards around torch-pruning 1.6 while it builds groups: a budget on a group's growth, a deadline per root, split
offsets resynced after a group prunes a split, and input shapes for trace messages."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp

from prunekit.errors import PruningError


class _GroupTooLarge(Exception):
    pass


@contextmanager
def index_budget(entries: int, dependencies: int) -> Iterator[list[int]]:
    """While active, a torch-pruning group raises ``_GroupTooLarge`` once more than ``entries`` index entries or
    ``dependencies`` dependencies were added to it. Yields the counters ``[entries, dependencies]``, which the
    caller resets before each group."""
    group_cls = tp.dependency.group.Group
    add_dep = group_cls.add_dep
    used = [0, 0]

    def counted(self: Any, dep: Any, idxs: Any) -> None:
        used[0] += len(idxs)
        used[1] += 1
        if used[0] > entries or used[1] > dependencies:
            raise _GroupTooLarge
        add_dep(self, dep, idxs)

    group_cls.add_dep = counted
    try:
        yield used
    finally:
        group_cls.add_dep = add_dep


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """Raise ``PruningError(message)`` if the block runs longer than ``seconds``.

    A watchdog thread raises the error inside the running thread (``PyThreadState_SetAsyncExc``, at the next Python
    bytecode): no signal is involved, since a SIGALRM delivered while a runtime's worker threads exist (OpenVINO's,
    after an int8 model ran in the process) crashed the process. A block stuck inside one C call is interrupted when
    that call returns.
    """
    if seconds <= 0:
        yield
        return
    target, lock, state = threading.get_ident(), threading.Lock(), {"active": True, "fired": False}

    class _Expired(PruningError):
        pass

    def watchdog() -> None:
        if stop.wait(seconds):
            return
        with lock:
            if state["active"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_Expired))

    stop = threading.Event()
    thread = threading.Thread(target=watchdog, name="prunekit-deadline", daemon=True)
    thread.start()
    try:
        try:
            yield
        finally:
            with lock:  # after this, the watchdog schedules nothing; one it already scheduled fires here at the latest
                state["active"] = False
            stop.set()
    except _Expired:
        raise PruningError(message) from None


def describe_inputs(x: Any) -> str:
    """Shapes of a model input for messages: ``tensor[1, 3, 32, 32]``, ``(tensor[..], ...)``, ``{'k': tensor[..]}``."""
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    return type(x).__name__


def _empties(dg: Any, item: Any) -> bool:
    """The group item removes every remaining channel (input or output side) of its layer."""
    m, fn = item.dep.target.module, item.dep.handler
    n = dg.get_out_channels(m) if dg.is_out_channel_pruning_fn(fn) else \
        dg.get_in_channels(m) if dg.is_in_channel_pruning_fn(fn) else None
    return n is not None and n <= len(item.idxs)


def sync_split_offsets(dg: Any) -> None:
    """Recompute every split node's offsets from its sizes. torch-pruning 1.6's ``SplitPruner`` updates a split's
    ``split_sizes`` when a group prunes it but writes the new offsets onto itself, not the split, so the index
    mapping of every later group would still use the unpruned offsets (ShuffleNetV2's split of the stream)."""
    for node in dg.module2node.values():
        sizes = getattr(node.module, "split_sizes", None)
        if node.type == tp.ops.OPTYPE.SPLIT and sizes and None not in sizes:
            offsets = [0]
            for c in sizes:
                offsets.append(offsets[-1] + c)
            node.module.offsets = offsets
