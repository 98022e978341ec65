"""Batch helpers, the one copy every layer uses: split a batch into inputs and labels, move it to a device, call a
model with it and read its batch size.

A batch is a tensor, a tuple/list (``(inputs, labels)`` or ``(inputs,)``), or a mapping of keyword tensors whose
``"labels"`` key, when present, holds the targets (Hugging Face style).

Example:
    >>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> out = call_model(model, to_device(x, "cpu"))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError

__all__ = ["batch_size_of", "call_model", "split_batch", "to_device"]


def to_device(x: Any, device: str | torch.device, non_blocking: bool = False) -> Any:
    """``x`` with every tensor in it (nested dicts, tuples and lists) moved to ``device``; other values unchanged.

    ``non_blocking=True`` overlaps a copy from pinned memory with compute (the training loop's choice); keep the
    default when the result is read on the host right away.
    """
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


def split_batch(batch: Any, *, strict: bool = True) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` from a batch.

    ``x`` -> ``(x, None)``; ``(x,)`` -> ``(x, None)``; ``(x, y)`` -> ``(x, y)``; a mapping -> (a dict without its
    ``"labels"`` key, the labels or None).

    Args:
        batch: one batch of a data loader or of calibration data.
        strict: refuse what cannot be read for sure (calibration data): a tuple/list of three or more items (extra
            positional inputs or labels?) or an object of another type. ``strict=False`` (the training loop) reads
            ``(x, y, *rest)`` as ``(x, y)`` and passes any other object through as the inputs.

    Raises:
        PruningError: an empty tuple/list, or (strict) a batch of another shape, naming its type.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2 or (len(batch) > 2 and not strict):
            return batch[0], batch[1]
        raise PruningError(f"cannot read a batch that is a {type(batch).__name__} of {len(batch)} items: expected "
                           "(inputs,) or (inputs, labels); pack several model inputs as a dict of keyword tensors")
    if not strict:
        return batch, None
    raise PruningError(f"cannot read a calibration batch of type {type(batch).__name__}: expected a tensor, "
                       "an (inputs, labels) pair or a dict of tensors")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional tensors, or a dict of keyword tensors."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: Any) -> int:
    """The leading dimension of ``inputs`` (a tensor, or the first tensor of a tuple/list or dict)."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return int(inputs.shape[0])
