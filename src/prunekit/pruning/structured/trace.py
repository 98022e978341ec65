"""What torch-pruning traces, for the modules its index mapping cannot follow (see ``prunekit.models.prunable``).

``channel_trace_forms(model)``  while active, every module with a ``channel_trace`` method runs that instead of its
                                ``forward``: the same channel dependencies without the spatial reshapes (Swin's
                                window partition, patch merging's strided slices).
``CUSTOMIZED_PRUNERS``          torch-pruning pruners for prunekit's own modules (``ChannelShuffle``), passed to
                                ``build_dependency(customized_pruners=...)``.
``link_permutations(DG)``       after tracing: the index mappings through each ``ChannelShuffle``, so a channel is
                                followed through the shuffle to the position it really lands on.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch_pruning as tp
from torch import nn

from prunekit.models.prunable import ChannelShuffle


@contextmanager
def channel_trace_forms(model: nn.Module) -> Iterator[int]:
    """Run ``channel_trace`` in place of ``forward`` for every module that has one; yields how many."""
    patched = [m for m in model.modules() if callable(getattr(type(m), "channel_trace", None))]
    for m in patched:
        m.forward = types.MethodType(type(m).channel_trace, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


class ChannelShufflePruner(tp.pruner.function.BasePruningFunc):
    """Prunes a ``ChannelShuffle``. Input and output side are one function (torch-pruning couples them); the indices
    it receives are always input channels: ``link_permutations`` maps output positions to inputs on the way in."""

    TARGET_MODULES = (ChannelShuffle,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        layer.remove_inputs(list(idxs))
        return layer

    prune_in_channels = prune_out_channels  # one function: the intra-layer dependency

    def get_out_channels(self, layer: nn.Module) -> int:
        return len(layer.perm)

    get_in_channels = get_out_channels


CUSTOMIZED_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {ChannelShuffle: ChannelShufflePruner()}


class _Permutation:
    """Index mapping through a ``ChannelShuffle`` (read at call time: the permutation shrinks as it is pruned).
    ``to_output``: input channel -> the output position it lands on; else output position -> its input channel."""

    def __init__(self, module: ChannelShuffle, to_output: bool):
        self.module, self.to_output = module, to_output

    def __call__(self, idxs: list[Any]) -> list[Any]:
        perm = self.module.perm
        table = {c: p for p, c in enumerate(perm)} if self.to_output else dict(enumerate(perm))
        return [tp._helpers._HybridIndex(idx=table[i.idx], root_idx=i.root_idx) for i in idxs]


def link_permutations(dg: Any) -> int:
    """Set the index mappings of the dependencies into and out of every ``ChannelShuffle`` node: the node's own
    indices are input channels, so edges to its outputs map input -> output position and edges from its outputs
    map output position -> input. Returns how many shuffles were linked."""
    n = 0
    for module, node in dg.module2node.items():
        if not isinstance(module, ChannelShuffle):
            continue
        outs = set(node.outputs)
        for dep in node.dependencies:  # shuffle -> its outputs
            if dep.target in outs:
                _set_mapping(dep, _Permutation(module, to_output=True))
        for out in node.outputs:  # an output -> the shuffle
            for dep in out.dependencies:
                if dep.target is node:
                    _set_mapping(dep, _Permutation(module, to_output=False), first=True)
        n += 1
    return n


def _set_mapping(dep: Any, mapping: _Permutation, first: bool = False) -> None:
    """Compose ``mapping`` with whatever torch-pruning put on ``dep`` (its two slots run in order): ``first`` runs
    it before the existing one (edges into the shuffle), else after (edges out of it)."""
    slot = 0 if first else 1
    other = dep.index_mapping[1 - slot]
    if dep.index_mapping[slot] is None:
        dep.index_mapping[slot] = mapping
    elif other is None:
        dep.index_mapping[1 - slot] = dep.index_mapping[slot]
        dep.index_mapping[slot] = mapping
    else:
        raise RuntimeError(f"dependency {dep} already has two index mappings; cannot add the channel shuffle's")
