"""From settings to units: which layers are targets (presets, only/ignore regexes, heads) and their groups."""

from __future__ import annotations

import logging

from prunekit.errors import PruningError, compile_patterns
from prunekit.pruning.structured.graph import (
    PruningGraph,
    Unit,
    first_override,
    match_layers,
    matches,
)
from prunekit.pruning.structured.presets import PRESETS
from prunekit.pruning.structured.settings import StructuredConfig

log = logging.getLogger(__name__)


def plan_units(graph: PruningGraph, s: StructuredConfig) -> list[Unit]:
    """The units (groups) that ``s`` allows to prune: every conv/linear group minus the classifier/outputs,
    attention internals (unless ``heads``), what the preset excludes, what ``only`` does not name and what
    ``ignore`` names."""
    all_names = list(graph.modules)
    projections = graph.projections()
    head_units: dict[str, object] = {}
    skip = set(projections)  # attention internals: never pruned channel by channel
    if s.layers.heads:
        supported = [a for a in graph.attention if a.supports_head_pruning() is None]
        refused = [a for a in graph.attention if a.supports_head_pruning() is not None]
        if refused:
            raise PruningError(f"heads=True: attention {refused[0].name!r} cannot lose heads: "
                               f"{refused[0].supports_head_pruning()}")
        if not supported:
            raise PruningError(f"heads=True but {type(graph.model).__name__} has no multi-head attention module "
                               "of a known layout (timm qkv, HF query/key/value)")
        head_units = {p: a for a in supported for p in a.projections}
        skip -= set(head_units)

    groups = graph.groups(ignored=sorted(skip))
    candidates = {n for n in graph.layers if n not in skip}
    if s.layers.preset:
        candidates &= PRESETS.get(s.layers.preset)(graph, groups) | set(head_units)
    if s.layers.only:
        candidates &= match_layers(graph.layers, s.layers.only, "only", all_names)
    if s.layers.ignore:
        candidates -= match_layers(graph.layers, s.layers.ignore, "ignore", all_names)

    units = []
    for group in groups:
        outs, _ = graph.members(group)
        if outs and set(outs) <= candidates:
            units.append(graph.make_unit(group, head_units))
    if not units:
        raise PruningError(f"nothing to prune in {type(graph.model).__name__}: no group of coupled layers is left "
                           f"after the preset/only/ignore choices (preset={s.layers.preset!r}, only={s.layers.only}, "
                           f"ignore={s.layers.ignore}); the classifier's outputs are never pruned")
    log.debug("%d prunable groups: %s", len(units), ", ".join(u.name for u in units))
    return units


def apply_ratio_caps(units: list[Unit], s: StructuredConfig, graph: PruningGraph) -> list[Unit]:
    """Set each unit's own cap from ``ratio_caps`` (the lowest cap of any regex matching one of its layers) and
    leave out the units capped at 0. A regex that matches no module is an error."""
    if not s.layers.ratio_caps:
        return units
    names = list(graph.modules)
    for key in s.layers.ratio_caps:
        match_layers(names, [key], "ratio_caps", names)  # raises naming near candidates
    compiled = dict(zip(s.layers.ratio_caps, compile_patterns(s.layers.ratio_caps, "ratio_caps")))
    kept = []
    for u in units:
        caps = [c for k, c in s.layers.ratio_caps.items() if any(matches(layer, compiled[k]) for layer in u.layers)]
        u.max_ratio = min(caps) if caps else None
        if u.max_ratio == 0:
            continue
        kept.append(u)
    if len(kept) < len(units):
        log.info("ratio_caps: %d of %d groups left unpruned (cap 0), %d capped below max_ratio", len(units) - len(kept),
                 len(units), sum(u.max_ratio is not None and u.max_ratio < s.layers.max_ratio for u in kept))
    if not kept:
        raise PruningError("ratio_caps leave no group to prune (every group is capped at 0)")
    return kept


def unit_overrides(units: list[Unit], s: StructuredConfig, graph: PruningGraph) -> dict[str, float]:
    """Unit name -> its own ratio, from ``ratio_overrides`` (first matching regex wins; a group matches when any
    of its layers does). A regex that matches no module is an error."""
    if not s.layers.ratio_overrides:
        return {}
    names = list(graph.modules)
    compiled = dict(zip(s.layers.ratio_overrides, compile_patterns(s.layers.ratio_overrides, "ratio_overrides")))
    for key in s.layers.ratio_overrides:
        match_layers(names, [key], "ratio_overrides", names)  # raises naming near candidates
    out = {}
    for u in units:
        for layer in u.layers:
            r = first_override(layer, s.layers.ratio_overrides, compiled)
            if r is not None:
                out[u.name] = r
                break
    return out
