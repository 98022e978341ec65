"""Widths checked in context: the latency table's choice for the costliest groups, timed inside the whole network.

The table (``prunekit.pruning.structured.latency``) times every layer alone; inside the network a width can cost
more or less than alone (layout changes between layers, cache, how the work splits over threads; for int8 kernels
on ONNX Runtime a 56-channel stack measured 0.42 ms alone and 0.62 ms in context, slower than 52 channels). With
``latency_context_groups = K`` the K groups with the largest predicted latency at their chosen width are revisited
one after another: the whole pruned model is timed on the backend (paired, alternating) at the chosen width and at
the grid counts one step below and above, among those that keep the MACs kept within ``tol`` of the table's
choice, with the dense model in the same paired timing; the width with the largest latency cut per MACs cut is kept
(a step down always saves time: the plain fastest would just prune more) and the next group is tried on top of it
(greedy). Each group costs two more pruned
copies and one paired timing of three models: seconds for a small CNN, minutes for ResNet-50 on int8 (every copy is
exported and quantized).

Example:
    >>> prune(model, x, target_macs=0.5, latency_backend="onnxruntime-int8", latency_context_groups=4)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.pruning.structured.graph import PruningGraph, Unit, copy_graph
from prunekit.pruning.structured.selection import Selection, max_removable

log = logging.getLogger(__name__)
CONTEXT_TOL = 0.02  # a candidate width may move the fraction of MACs kept by at most this much
TimeModels = Callable[[dict[str, nn.Module]], dict[str, float]]  # name -> model ... -> name -> ms (injectable)


def model_timer(example_inputs: Any, backend: str, threads: int, runs: int = 20) -> TimeModels:
    """Median ms of each model, timed alternately on ``backend`` (eager: inference copies; onnxruntime-int8:
    quantized first)."""
    from prunekit.measure.latency import compare_latency
    from prunekit.measure.latency_int8 import compare_int8_latency
    from prunekit.measure.latency_table import channels_last_inputs, inference_copy

    def time_models(models: dict[str, nn.Module]) -> dict[str, float]:
        if backend.endswith("-int8"):
            st = compare_int8_latency(models, example_inputs, threads, runs=runs, rounds=min(runs, 10),
                                      backend=backend)
        elif backend == "eager":
            st = compare_latency({k: inference_copy(m)[0] for k, m in models.items()},
                                 channels_last_inputs(example_inputs), "eager", runs=runs, warmup=3, threads=threads,
                                 rounds=min(runs, 10))
        else:
            st = compare_latency(models, example_inputs, backend, runs=runs, warmup=3, threads=threads,
                                 rounds=min(runs, 10))
        return {k: s.median_ms for k, s in st.items()}
    return time_models


def with_width(sel: Selection, u: Unit, scores: dict[str, torch.Tensor], channels: int) -> Selection:
    """``sel`` with group ``u`` keeping ``channels`` channels (its lowest-scored elements removed)."""
    n = u.size - channels // u.ch_groups
    removed = dict(sel.removed)
    if n > 0:
        removed[u.name] = sorted(torch.sort(scores[u.name].float(), stable=True).indices[:n].tolist())
    else:
        removed.pop(u.name, None)
    return Selection(removed=removed, capped=list(sel.capped), shortfall=sel.shortfall)


def _pruned(graph: PruningGraph, units: list[Unit], sel: Selection) -> nn.Module:
    from prunekit.pruning.structured.apply import apply_selection

    g = copy_graph(graph)
    apply_selection(g, units, sel)
    return g.model.eval()


def refine_in_context(graph: PruningGraph, units: list[Unit], scores: dict[str, torch.Tensor], sel: Selection,
                      lm: Any, k: int, max_ratio: float, macs_of: Callable[[Selection], float],
                      time_models: TimeModels, tol: float | None = None) -> tuple[Selection, list[dict[str, Any]]]:
    """The greedy in-context check of the module doc (``macs_of``: fraction of the MACs a selection keeps;
    ``time_models``: name -> ms of models timed together). Returns the refined selection and one record per group
    tried (``group``, ``table`` width, ``timed``: width -> [ms, MACs kept, efficiency], ``dense_ms``, ``chosen``;
    or ``skipped``: why not)."""
    from prunekit.pruning.structured.latency import kept_channels

    tol = CONTEXT_TOL if tol is None else tol
    by_name = {u.name: u for u in units}
    kept = kept_channels(units, sel)
    per_layer = lm.per_layer(kept)
    cost = {n: sum(ms for layer, ms in per_layer.items() if n in (lm.layers[layer].out_unit, lm.layers[layer].in_unit))
            for n in lm.units if n in kept and kept[n] < by_name[n].channels}
    base_macs, trials = macs_of(sel), []
    for name in sorted(cost, key=cost.get, reverse=True)[:k]:
        u, grid = by_name[name], lm.grids[name]
        c = kept_channels(units, sel)[name]
        min_keep = (u.size - max_removable(u, max_ratio)) * u.ch_groups
        i = grid.index(c) if c in grid else min(range(len(grid)), key=lambda j: abs(grid[j] - c))
        cands, macs = {c: sel}, {c: macs_of(sel)}
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid) and min_keep <= grid[j] != c:
                s2 = with_width(sel, u, scores, grid[j])
                if abs((m2 := macs_of(s2)) - base_macs) <= tol:
                    cands[grid[j]], macs[grid[j]] = s2, m2
        if len(cands) == 1:  # a small model: one grid step of this group moves the MACs too far
            trials.append({"group": name, "table": c, "chosen": c, "skipped": f"no neighbour width within {tol} "
                           "of the MACs kept"})
            continue
        ms = time_models({"dense": graph.model, **{str(w): _pruned(graph, units, s) for w, s in cands.items()}})
        eff = {w: (1 - ms[str(w)] / ms["dense"]) / max(1 - macs[w], 1e-9) for w in cands}
        best = max(cands, key=eff.get)
        trials.append({"group": name, "table": c, "dense_ms": round(ms["dense"], 4), "chosen": best,
                       "timed": {w: [round(ms[str(w)], 4), round(macs[w], 4), round(eff[w], 3)] for w in cands}})
        log.info("in-context widths: %s table %d, timed %s -> %d", name, c,
                 ", ".join(f"{w}: {ms[str(w)]:.3f} ms (efficiency {eff[w]:.2f})" for w in cands), best)
        sel = cands[best]
    return sel, trials
