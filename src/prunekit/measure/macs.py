"""MACs, FLOPs and parameter counts from a maintained counter (``torch.utils.flop_counter``).

MACs count multiply-accumulates of the dense ops (convolutions, matmuls, attention); FLOPs = 2 * MACs for those.
Element-wise ops (BN, activations, adds) are not counted, as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.batch import batch_size_of, call_model  # re-exported: the batch helpers live in prunekit.batch


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters set not to require grad while the counter runs (restored after). Under ``no_grad`` a view of a
    parameter (``self.query.expand(B, -1, -1)``, a learned token) still requires grad but has no grad function, and
    the counter's module tracker fails on it ("Expected gradient function to be set")."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: Any, per_sample: bool = True) -> int:
    """FLOPs of one forward pass (per sample by default)."""
    was_training = model.training
    model.eval()
    try:
        with frozen(model), FlopCounterMode(display=False) as fc:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
    flops = int(fc.get_total_flops())
    return flops // batch_size_of(example_inputs) if per_sample else flops


def count_macs(model: nn.Module, example_inputs: Any, per_sample: bool = True) -> int:
    """Multiply-accumulates of one forward pass (per sample by default).

    Example:
        >>> count_macs(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))  # ~4.1e9
    """
    return count_flops(model, example_inputs, per_sample) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
