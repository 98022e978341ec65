"""A user's own layers: declare what prunekit cannot infer from the traced graph.

``register_attention(cls, qkv=..., proj=..., num_heads_attr=..., head_dim_attr=...)``
    where an attention class keeps its heads, so ``heads=True`` removes whole heads from it (see ``heads.py``).
``register_channel_mapping(cls, pruner)``
    how a layer torch-pruning does not know (its own ``nn.Parameter`` used through ``F.conv2d``, ``F.linear``, ...)
    loses input/output channels: a ``torch_pruning.pruner.BasePruningFunc`` with ``prune_out_channels``,
    ``prune_in_channels``, ``get_out_channels`` and ``get_in_channels``. torch-pruning then treats the layer as one
    node of the graph and calls the pruner with the channel indices of every group that reaches it. Without it,
    torch-pruning traces the layer's functional ops and guesses which dimension of its raw parameters to prune.

Example:
    >>> class WSConvPruner(torch_pruning.pruner.BasePruningFunc):
    ...     def prune_out_channels(self, layer, idxs): ...   # drop rows of layer.weight, set layer.out_channels
    ...     def prune_in_channels(self, layer, idxs): ...    # drop columns of layer.weight
    ...     def get_out_channels(self, layer): return layer.weight.shape[0]
    ...     def get_in_channels(self, layer): return layer.weight.shape[1]
    >>> prunekit.register_channel_mapping(WSConv, WSConvPruner())
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from prunekit.errors import ConfigError
from prunekit.pruning.structured.heads import LAYOUTS, AttentionLayout, register_attention
from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS

__all__ = ["AttentionLayout", "register_attention", "register_channel_mapping", "LAYOUTS", "CUSTOMIZED_PRUNERS"]

_METHODS = ("prune_out_channels", "prune_in_channels", "get_out_channels", "get_in_channels")


def register_channel_mapping(cls: type, pruner: tp.pruner.BasePruningFunc | type) -> tp.pruner.BasePruningFunc:
    """Declare how layers of class ``cls`` lose channels: ``pruner`` (an instance or a class of
    ``torch_pruning.pruner.BasePruningFunc``) is passed to torch-pruning's ``customized_pruners`` for every
    model prunekit traces from now on. Returns the pruner instance."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_channel_mapping: {cls!r} is not an nn.Module class; pass the class itself")
    if isinstance(pruner, type):
        pruner = pruner()
    missing = [m for m in _METHODS if not callable(getattr(pruner, m, None))]
    if not isinstance(pruner, tp.pruner.BasePruningFunc) or missing:
        raise ConfigError(f"register_channel_mapping({cls.__name__}): pruner {pruner!r} must be a torch_pruning."
                          f"pruner.BasePruningFunc with {', '.join(_METHODS)}" + (f" (missing {missing})"
                                                                                  if missing else ""))
    CUSTOMIZED_PRUNERS[cls] = pruner
    return pruner
