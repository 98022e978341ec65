"""What torch-pruning traces, for the modules its index mapping cannot follow (see ``prunekit.models.prunable``).

``channel_trace_forms(model)``  while active, every module with a ``channel_trace`` method (or a form in
                                ``TRACE_FORMS``: timm's Swin blocks and patch merging, which run fine once pruned)
                                runs that instead of its ``forward``: the same channel dependencies without the
                                spatial reshapes (Swin's window partition, patch merging's strided slices).
``CUSTOMIZED_PRUNERS``          torch-pruning pruners for prunekit's own modules (``ChannelShuffle``) and for torch
                                layers it does not know (``nn.GRU`` / ``nn.RNN`` inputs), passed to
                                ``build_dependency(customized_pruners=...)``.
``link_permutations(DG)``       after tracing: the index mappings through each ``ChannelShuffle``, so a channel is
                                followed through the shuffle to the position it really lands on.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from prunekit.models.prunable import ChannelShuffle, attention_trace, merging_trace


def _timm_swin_block(block: nn.Module, x: Tensor) -> Tensor:
    """timm ``SwinTransformerBlock`` (B, H, W, C): its window attention and MLP without the window reshapes."""
    x = x + attention_trace(block.attn, block.norm1(x))
    return x + block.mlp(block.norm2(x))


def _timm_merging(m: nn.Module, x: Tensor) -> Tensor:
    """timm ``PatchMerging``: its reshape/permute/flatten puts channel c at c, C+c, 2C+c, 3C+c, like the concat."""
    return merging_trace(m, x, norm_first=True)


def _recurrent(rnn: nn.RNNBase, x: Any, hx: Any = None) -> Any:
    """``nn.GRU`` / ``nn.RNN``: one linear map from the input features to the output features, and a zero final
    state, the shapes the real forward gives. Traced as it runs, a recurrent layer shows torch-pruning its internal
    matmuls, stacks and views (on the CPU), through which it maps the input channels onto the hidden units."""
    if not isinstance(x, Tensor):  # a PackedSequence: the real forward (not traceable as channels)
        return type(rnn).forward(rnn, x, hx)
    dirs = 2 if rnn.bidirectional else 1
    y = F.linear(x, x.new_zeros(rnn.hidden_size * dirs, x.shape[-1]))  # (..., T, H*D): input side -> output side
    batch = () if x.dim() == 2 else (x.shape[0 if rnn.batch_first else 1],)
    return y, x.new_zeros(rnn.num_layers * dirs, *batch, rnn.hidden_size)


def _library_forms() -> dict[type, Callable[..., Any]]:
    """Trace forms for library classes that run fine once pruned and only need tracing help (exact types)."""
    forms: dict[type, Callable[..., Any]] = {nn.GRU: _recurrent, nn.RNN: _recurrent}
    try:
        from timm.models import swin_transformer as timm_swin
    except ImportError:
        return forms
    return {**forms, timm_swin.SwinTransformerBlock: _timm_swin_block, timm_swin.PatchMerging: _timm_merging}


TRACE_FORMS = _library_forms()


@contextmanager
def channel_trace_forms(model: nn.Module) -> Iterator[int]:
    """Run a module's ``channel_trace`` (or its form in ``TRACE_FORMS``) in place of ``forward`` for every module
    that has one; yields how many."""
    patched = []
    for m in model.modules():
        fn = getattr(type(m), "channel_trace", None) or TRACE_FORMS.get(type(m))
        if callable(fn):
            m.forward = types.MethodType(fn, m)
            patched.append(m)
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


class RecurrentInputPruner(tp.pruner.function.BasePruningFunc):
    """Prunes the inputs of an ``nn.GRU`` / ``nn.RNN`` (first layer's ``weight_ih``, both directions). torch-pruning
    knows only ``nn.LSTM``; it takes any other module with parameters for an element-wise layer and maps the channels
    of the layer feeding it onto its hidden size (an index error, or a wrong cut). Its hidden size stays whole."""

    TARGET_MODULES = (nn.GRU, nn.RNN)

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.input_size)) - set(int(i) for i in idxs))
        for suffix in ("", "_reverse") if layer.bidirectional else ("",):
            name = "weight_ih_l0" + suffix
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        layer._init_flat_weights()  # the flat weight list cuDNN reads still holds the old tensors
        return layer

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError(f"{type(layer).__name__}'s hidden size is not pruned")

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return layer.hidden_size * (2 if layer.bidirectional else 1)


CUSTOMIZED_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {
    ChannelShuffle: ChannelShufflePruner(), nn.GRU: RecurrentInputPruner(), nn.RNN: RecurrentInputPruner()}


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
