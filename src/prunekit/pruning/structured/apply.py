"""Lifecycle step 5, apply: compensate each group's consumers, then remove its channels (``group.prune()``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.pruning.structured.graph import PruningGraph, Unit
from prunekit.pruning.structured.heads import sync_attributes
from prunekit.pruning.structured.report import GroupRecord
from prunekit.pruning.structured.selection import Selection


def apply_selection(graph: PruningGraph, units: list[Unit], sel: Selection,
                    compensator: Any = None) -> tuple[list[GroupRecord], list[dict[str, Any]]]:
    """Remove the selected elements from ``graph.model`` (the graph may be a copy of the units' graph)."""
    records, compensation = [], []
    attention = {a.name: a for a in graph.attention}
    for u in units:
        elements = sel.removed.get(u.name)
        if not elements:
            continue
        group, idxs = graph.checked_group(u, u.channel_indices(elements))  # raises if a layer would be emptied
        if compensator is not None:
            compensation.extend(compensator.apply(group, idxs))
        group.prune()
        rec = GroupRecord(u.name, list(u.layers), list(u.consumers), u.channels, u.channels - len(idxs), list(idxs))
        if u.attention is not None:
            att = attention[u.attention.name]
            rec.heads_before, rec.heads_after = att.num_heads, att.num_heads - len(elements)
            att.set_heads(rec.heads_after, removed=sorted(elements))
        records.append(rec)
    if compensator is not None:
        compensator.finish()  # one warning for the layers fitted on too little calibration data
    sync_attributes(graph.model)
    return records, compensation


def out_channels(graph: PruningGraph) -> dict[str, int]:
    """Layer name -> its output channels (features) now."""
    out = {}
    for name in graph.layers:
        m = graph.modules[name]
        out[name] = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
    return out


def uncompensable(compensator: Any, units: list[Unit], sel: Selection) -> dict[str, str]:
    """Unit name -> why no consumer of its removed channels can be compensated (checked before anything is
    pruned, so those groups can stay whole and the rest be pruned)."""
    from prunekit.errors import PruningError

    out = {}
    for u in units:
        if sel.removed.get(u.name):
            try:
                compensator.check(u.group)
            except PruningError as e:
                out[u.name] = str(e)
    return out
