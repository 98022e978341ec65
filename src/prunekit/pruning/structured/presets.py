"""Presets: named choices of which layers' output channels may be pruned.

``mlp-only``  transformer MLP hidden layers only (timm ``mlp.fc1``, HF ``intermediate.dense``, LLaMA
              ``gate_proj``/``up_proj``, torchvision ``mlp.0``): attention, embeddings, classifier and the residual
              stream stay untouched.
``interior``  CNN block-internal channels only: groups that live inside one repeated block (ResNet ``conv1``/
              ``conv2`` of a block, MobileNetV2 expand + depthwise), never the stem, a block's output/projection,
              a downsample shortcut or the classifier.

Example:
    >>> prunekit.prune(model, x, preset="interior", ratio=0.5)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.graph import ROOT_TYPES, PruningGraph
from prunekit.registry import Registry

# preset(graph, groups) -> names of the conv/linear layers whose output channels may be pruned
Preset = Callable[[PruningGraph, list[Any]], set[str]]
PRESETS: Registry[Preset] = Registry("preset")
register_preset = PRESETS.register


def list_presets() -> list[str]:
    return PRESETS.names()


MLP_HIDDEN = re.compile(r"(.*\.)?(mlp\.fc1|intermediate\.dense|mlp\.(gate_proj|up_proj)|mlp\.0|"
                        r"feed_forward\.(w1|w3)|ffn\.(fc1|lin1)|mlp\.c_fc)")


@register_preset("mlp-only")
def mlp_only(graph: PruningGraph, groups: list[Any]) -> set[str]:
    """The hidden layers of transformer MLPs, by name (see MLP_HIDDEN)."""
    chosen = {n for n in graph.layers if MLP_HIDDEN.fullmatch(n) and isinstance(graph.modules[n], nn.Linear)}
    if not chosen:
        raise PruningError(f"preset 'mlp-only' found no transformer MLP layers in {type(graph.model).__name__} "
                           "(it knows timm 'mlp.fc1', HF 'intermediate.dense', LLaMA 'mlp.gate_proj'/'mlp.up_proj', "
                           "torchvision 'mlp.0'); select layers with only=[...] instead")
    return chosen


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Repeated blocks: non-leaf modules whose class occurs at least twice and that hold >= 2 conv/linear layers."""
    named = dict(model.named_modules())
    counts = Counter(type(m) for m in named.values())
    out = {}
    for name, m in named.items():
        if not name or counts[type(m)] < 2 or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if sum(isinstance(x, ROOT_TYPES) for x in m.modules()) >= 2:
            out[name] = m
    return out


def _innermost_block(name: str, blocks: dict[str, nn.Module]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in blocks:
            return prefix
    return None


@register_preset("interior")
def interior(graph: PruningGraph, groups: list[Any]) -> set[str]:
    """Groups whose conv/linear layers (both sides) all sit in one repeated block and none reads the input."""
    blocks = _blocks(graph.model)
    if not blocks:
        raise PruningError(f"preset 'interior' found no repeated blocks (residual or inverted-residual) in "
                           f"{type(graph.model).__name__}; select layers with only=[...] instead")
    stems = graph.stem_layers()
    chosen: set[str] = set()
    for group in groups:
        outs, ins = graph.members(group)
        homes = {_innermost_block(n, blocks) for n in outs + ins}
        if len(homes) == 1 and None not in homes and not stems & set(outs):
            chosen |= set(outs)
    if not chosen:
        raise PruningError(f"preset 'interior' found no block-internal channels in {type(graph.model).__name__}")
    return chosen
