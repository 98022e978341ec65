"""Latency-aware structured pruning: how many channels each group keeps, from measured per-layer latency.

The criterion still decides *which* channels go (the ranking, unchanged); this module decides *how many* each
group keeps, from a latency lookup table of the target backend (``prunekit.measure.latency_table``):

1. Every conv/linear layer of the model is timed alone with its real input shape, at a grid of output channel counts
   (input channels full) and of input channel counts (output channels full): two step curves per layer, ``f_out(c)``
   and ``f_in(c)``, as fractions of the layer's full-width latency (a depthwise conv: one curve, both at once).
   The curves are made monotone by isotonic regression (a count costs at most what any larger count costs:
   noise and kernel quirks otherwise make a larger count look cheaper).
2. A group's latency curve ``T_g(c)`` sums the curves of the layers whose output (root layer and coupled layers) or
   input (consumers) channels it sets.
3. Width choice (``choose_width``): a group asked to keep ``k`` channels keeps the largest grid count at or above the
   grid count just below ``k`` whose latency is the same (within a fraction of one average step): the top of the
   latency step it lands on. It never ends just past a step edge (paying a whole step for a few channels), and it
   keeps the channels that cost nothing.
4. The model latency is predicted as ``rest + sum_L t_L * f_out_L(c_out) * f_in_L(c_in)`` (``rest``: the ops the
   table does not time, measured on the dense model with its layers stubbed out (eager) or from ONNX Runtime's
   per-node profile (``prunekit.measure.latency_table.rest_latency_ms``), held constant).
5. ``target_latency`` (fraction of the dense latency kept) bisects the global ranking (the number of pooled channels
   removed; the per-group ratio for local scope) on that prediction, with the width choice inside every probe; the
   engine then times dense and pruned alternately on the backend and reports predicted vs measured.

Backends: ``eager``, ``onnxruntime`` (float32), ``onnxruntime-int8`` and ``openvino-int8`` (each layer quantized as
``prunekit quantize`` does, its int8 kernels timed; grid every 4 channels: ``prunekit.measure.latency_int8``).
``latency_context_groups`` then re-times the costliest groups' widths inside the whole model (``latency_context``).

Reference: HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) uses per-layer
latency tables of the same kind; this module keeps prunekit's ranking and only moves each group's width to the
latency steps, which is cheap (no knapsack) and keeps the criterion's choice of channels.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.measure.latency_int8 import INT8_ROUND_TO, rest_latency_ms
from prunekit.measure.latency_table import LatencyTable, OpSpec, collect_op_specs
from prunekit.pruning.structured.graph import PruningGraph, Unit
from prunekit.pruning.structured.selection import Selection, max_removable, select

log = logging.getLogger(__name__)
STEP_FRACTION = 0.3  # counts within this fraction of the group's average grid step of latency are "the same"
MAX_PROBES = 60


def channel_grid(channels: int, min_keep: int, multiple: int = 1, round_to: int | None = None) -> list[int]:
    """Channel counts timed for a group of ``channels``: every 4 up to 64 channels, every 8 up to 512, every 16
    above, from ``min_keep`` to the full width (always included), each a multiple of ``multiple`` (channel blocks,
    heads) and of ``round_to`` when given."""
    fine = 4 if channels <= 64 else 8 if channels <= 512 else 16
    step = math.lcm(fine, multiple, round_to or 1)
    if step > channels:
        step = math.lcm(multiple, round_to or 1)
    lo = max(step, (min_keep // step) * step)
    grid = list(range(lo, channels + 1, step)) if step <= channels else []
    if channels not in grid:
        grid.append(channels)
    return grid


@dataclass
class LayerCost:
    """One layer in the latency model: which group sets its output / input channels, and its curves."""

    name: str
    spec: OpSpec
    full_ms: float
    out_unit: str | None = None
    in_unit: str | None = None
    f_out: dict[int, float] = field(default_factory=dict)  # channels -> fraction of full_ms (monotone)
    f_in: dict[int, float] = field(default_factory=dict)


def _monotone(raw: dict[int, float]) -> dict[int, float]:
    """The non-decreasing fit of ``raw`` over the channel counts (isotonic regression, pool-adjacent-violators):
    a count never costs more than a larger one. Violating neighbours are averaged, so one entry timed low by chance
    does not flatten every count below it (a running minimum would)."""
    keys = sorted(raw)
    blocks: list[list[float]] = []  # [sum, count]
    for c in keys:
        blocks.append([raw[c], 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s_, n_ = blocks.pop()
            blocks[-1][0] += s_
            blocks[-1][1] += n_
    out, i = {}, 0
    for total, n in blocks:
        for _ in range(int(n)):
            out[keys[i]] = total / n
            i += 1
    return out


def _lookup(curve: dict[int, float], grid: list[int], c: int) -> float:
    """The curve at the smallest grid count >= c (a count between grid points costs what the next one does)."""
    if not curve:
        return 1.0
    i = bisect.bisect_left(grid, c)
    return curve[grid[min(i, len(grid) - 1)]]


class LatencyModel:
    """Per-group latency curves and the model latency they predict, for one backend (see the module doc).

    Args:
        graph: the pruning graph of the (dense) model.
        units: the prunable groups.
        example_inputs: the inputs the model is timed with (their shapes set each layer's input shape).
        table: the latency table to read and fill.
        max_ratio: the grid starts at the fewest channels a group may keep.
        round_to: grid counts are multiples of it (default: ``recommended_round_to(backend)``, the SIMD block of
            the backend's kernels: ONNX Runtime keeps activations in blocked NCHWc layout only between convs whose
            channels fill whole blocks, and inserts layout reorders around the others, which a layer timed alone
            does not show; within those multiples the table decides; int8 tables: 4, VNNI's input block).
        rest_ms: latency of the ops the table does not time (activations, adds, pooling, layout reorders; see
            ``prunekit.measure.latency_table.rest_latency_ms``), held fixed; 0: the prediction covers the layers.
    """

    def __init__(self, graph: PruningGraph, units: list[Unit], example_inputs: Any, table: LatencyTable,
                 max_ratio: float = 0.9, round_to: int | None = None, rest_ms: float = 0.0) -> None:
        from prunekit.measure.hardware import recommended_round_to

        self.table = table
        int8 = table.backend.endswith("int8")
        round_to = round_to or (INT8_ROUND_TO if int8 else recommended_round_to(table.backend))
        self.units = {u.name: u for u in units if u.attention is None}
        specs = collect_op_specs(graph.model, example_inputs)
        self.grids: dict[str, list[int]] = {}
        for u in self.units.values():
            min_keep = (u.size - max_removable(u, max_ratio)) * u.ch_groups
            self.grids[u.name] = channel_grid(u.channels, min_keep, math.lcm(u.ch_groups, u.multiple_of), round_to)
        self.layers: dict[str, LayerCost] = {}
        for name, spec in specs.items():
            self.layers[name] = LayerCost(name, spec, 0.0)
        for u in self.units.values():
            for n in u.layers:
                if n in self.layers:
                    self.layers[n].out_unit = u.name
            for n in u.consumers:
                if n in self.layers:
                    self.layers[n].in_unit = u.name
        for lc in self.layers.values():
            if lc.spec.depthwise:  # one group sets both sides: a single curve, held as f_out
                lc.in_unit = None if lc.out_unit is not None else lc.in_unit
                if lc.out_unit is None and lc.in_unit is not None:
                    lc.out_unit, lc.in_unit = lc.in_unit, None
        todo = [s for lc in self.layers.values() for s in (lc.spec, *self._out_specs(lc), *self._in_specs(lc))]
        table.measure(todo, "layer")
        for lc in self.layers.values():
            lc.full_ms = table[lc.spec]
            base = max(lc.full_ms, 1e-9)
            lc.f_out = _monotone({c: table[s] / base for c, s in zip(self._out_counts(lc), self._out_specs(lc),
                                                                        strict=True)})
            lc.f_in = _monotone({c: table[s] / base for c, s in zip(self._in_counts(lc), self._in_specs(lc),
                                                                       strict=True)})
        self.layer_ms = sum(lc.full_ms for lc in self.layers.values())
        self.rest_ms = float(rest_ms)
        self.dense_ms = self.layer_ms + self.rest_ms
        self.curves = {name: self._unit_curve(name) for name in self.units}

    # -- grids and specs per layer
    def _ok(self, spec: OpSpec, cin: int, cout: int) -> bool:
        return spec.depthwise or spec.kind == "linear" or (cin % spec.groups == 0 and cout % spec.groups == 0)

    def _out_counts(self, lc: LayerCost) -> list[int]:
        if lc.out_unit is None:
            return []
        cin = lc.spec.cin
        return [c for c in self.grids[lc.out_unit] if c <= lc.spec.cout and self._ok(lc.spec, cin, c)]

    def _in_counts(self, lc: LayerCost) -> list[int]:
        if lc.in_unit is None:
            return []
        return [c for c in self.grids[lc.in_unit] if c <= lc.spec.cin and self._ok(lc.spec, c, lc.spec.cout)]

    def _out_specs(self, lc: LayerCost) -> list[OpSpec]:
        if lc.spec.depthwise:
            return [lc.spec.with_channels(cin=c, cout=c) for c in self._out_counts(lc)]
        return [lc.spec.with_channels(cout=c) for c in self._out_counts(lc)]

    def _in_specs(self, lc: LayerCost) -> list[OpSpec]:
        return [lc.spec.with_channels(cin=c) for c in self._in_counts(lc)]

    # -- curves and prediction
    def _unit_curve(self, name: str) -> dict[int, float]:
        """Group latency (ms of its layers, other channels full) at every grid count, made monotone."""
        grid = self.grids[name]
        raw = dict.fromkeys(grid, 0.0)
        for lc in self.layers.values():
            for side, curve in (("out", lc.f_out), ("in", lc.f_in)):
                if (lc.out_unit if side == "out" else lc.in_unit) != name or not curve:
                    continue
                g = sorted(curve)
                for c in grid:
                    raw[c] += lc.full_ms * _lookup(curve, g, c)
        return _monotone(raw)

    def choose_width(self, name: str, keep: int, min_keep: int = 1) -> int:
        """Channels a group asked to keep ``keep`` (at least ``min_keep``) keeps: the top of the latency step that
        the grid count at or below ``keep`` lies on (see the module doc)."""
        grid, curve = self.grids[name], self.curves[name]
        cands = [c for c in grid if c >= min_keep]
        below = [c for c in cands if c <= keep]
        if not cands:
            return grid[-1]
        # no grid count at or below: start from the first one above (a count off the grid pays a full step)
        down = below[-1] if below else cands[0]
        lat = [curve[c] for c in cands]
        avg_step = (lat[-1] - lat[0]) / max(1, len(cands) - 1)
        limit = curve[down] + STEP_FRACTION * avg_step
        best = down
        for c in cands:
            if c > down and curve[c] <= limit:
                best = c
        return best

    def per_layer(self, channels: dict[str, int]) -> dict[str, float]:
        """Layer name -> predicted ms with each group at ``channels[group]`` channels (absent: full)."""
        out = {}
        for name, lc in self.layers.items():
            f = 1.0
            if lc.out_unit is not None and lc.f_out:
                f *= _lookup(lc.f_out, sorted(lc.f_out), channels.get(lc.out_unit, lc.spec.cout))
            if lc.in_unit is not None and lc.f_in:
                f *= _lookup(lc.f_in, sorted(lc.f_in), channels.get(lc.in_unit, lc.spec.cin))
            out[name] = lc.full_ms * f
        return out

    def predict(self, channels: dict[str, int]) -> float:
        """Predicted latency (ms) with each group at ``channels[group]`` channels (absent: full)."""
        return self.rest_ms + sum(self.per_layer(channels).values())

    def steps(self, name: str) -> list[tuple[int, float]]:
        """``[(channels, ms), ...]`` of a group's latency curve (for reports and figures)."""
        return sorted(self.curves[name].items())


def latency_widths(units: list[Unit], scores: dict[str, torch.Tensor], sel: Selection, lm: LatencyModel,
                   max_ratio: float) -> Selection:
    """``sel`` with every group's kept count moved by ``LatencyModel.choose_width``; the elements removed are the
    lowest-scored ones as before (the ranking decides which channels, the latency table how many)."""
    removed: dict[str, list[int]] = {}
    for u in units:
        n = len(sel.removed.get(u.name, []))
        if u.name in lm.units and n > 0:
            g = u.ch_groups
            min_keep = u.size - max_removable(u, max_ratio)
            keep = lm.choose_width(u.name, (u.size - n) * g, min_keep * g) // g
            n = u.size - max(min_keep, min(u.size, keep))
        if n > 0:
            order = torch.sort(scores[u.name].float(), stable=True).indices
            removed[u.name] = sorted(order[:n].tolist())
    return Selection(removed=removed, capped=list(sel.capped), shortfall=sel.shortfall)


def kept_channels(units: list[Unit], sel: Selection) -> dict[str, int]:
    return {u.name: (u.size - len(sel.removed.get(u.name, []))) * u.ch_groups for u in units if u.attention is None}


def latency_select(units: list[Unit], scores: dict[str, torch.Tensor], ratio: float, scope: str,
                   overrides: dict[str, float], max_ratio: float, lm: LatencyModel) -> Selection:
    """``select`` (no rounding) followed by the latency-step width choice."""
    return latency_widths(units, scores, select(units, scores, ratio, scope, overrides, max_ratio, None), lm,
                          max_ratio)


def search_latency(units: list[Unit], scores: dict[str, torch.Tensor], scope: str, overrides: dict[str, float],
                   max_ratio: float, lm: LatencyModel, target: float,
                   metric: Any = None, closest: bool = False
                   ) -> tuple[float, Selection, float, list[tuple[float, float]]]:
    """The least pruning whose predicted latency keeps at most ``target`` of the dense prediction (or, with
    ``metric(sel) -> fraction``, e.g. the MACs kept, at most ``target`` of that). ``closest``: the probe nearest
    the target from either side instead (the width choice makes the metric jump: ``target_macs`` wants the
    nearest).

    Returns ``(ratio, selection, kept_fraction, probes)``; global scope bisects the number of pooled channels
    removed, local scope the per-group ratio. Raises ``PruningError`` when even the most pruning allowed keeps more.
    """
    metric = metric or (lambda sel: lm.predict(kept_channels(units, sel)) / lm.dense_ms)
    probes: list[tuple[float, float]] = []
    pooled = sum(u.size for u in units if u.name not in overrides and u.attention is None)
    steps = 1 << 20 if scope == "local" or pooled == 0 else pooled

    def probe(i: int) -> tuple[float, Selection]:
        r = i / steps
        sel = latency_select(units, scores, r, scope, overrides, max_ratio, lm)
        kept = metric(sel)
        probes.append((r, kept))
        return kept, sel

    floor, sel_hi = probe(steps)
    if floor > target:
        raise PruningError(f"target {target} is out of reach: pruning every group to max_ratio {max_ratio} still "
                           f"keeps {floor:.1%} (predicted); raise max_ratio or prune more layers")
    lo, hi, best = 0, steps, (1.0, sel_hi, floor)
    near = best
    while hi - lo > 1 and len(probes) < MAX_PROBES:
        mid = (lo + hi) // 2
        kept, sel = probe(mid)
        if abs(kept - target) < abs(near[2] - target):
            near = (mid / steps, sel, kept)
        if kept <= target:
            hi, best = mid, (mid / steps, sel, kept)
        else:
            lo = mid
    if closest:
        best = near
    return best[0], best[1], best[2], probes


# ----------------------------------------------------------------------------------------------- engine entry
def latency_selection(model: nn.Module, graph: PruningGraph, example_inputs: Any, units: list[Unit],
                      scores: dict[str, torch.Tensor], s: Any, overrides: dict[str, float], macs_before: int,
                      scope: str) -> tuple[Selection, float, list[tuple[float, float]], dict[str, Any]]:
    """What the engine calls when ``s.latency.backend`` is set: build/load the table, choose the widths for
    ``ratio``, ``target_macs`` or ``target_latency``. Returns ``(selection, ratio, probes, latency_info)``."""
    from prunekit.pruning.structured.search import macs_kept

    backend = s.latency.backend or "eager"
    table = LatencyTable(backend, s.latency.threads)
    try:
        rest_ms = rest_latency_ms(model, example_inputs, backend, s.latency.threads)
    except Exception as e:  # an export or stub failure must not stop pruning: predict the timed layers only
        log.warning("latency-aware pruning: could not time the rest of the model on %s (%s: %s); predicted latency "
                    "fractions cover the conv/linear layers only", backend, type(e).__name__, str(e)[:200])
        rest_ms = 0.0
    lm = LatencyModel(graph, units, example_inputs, table, s.layers.max_ratio, s.layers.round_to, rest_ms)
    info: dict[str, Any] = {"backend": backend, "threads": s.latency.threads, "target_latency": s.target.latency,
                            "table": str(table.path),
                            "table_entries_timed": table.measured, "table_entries_cached": table.hits,
                            "table_seconds": round(table.build_seconds, 1), "table_spread": table.spread(),
                            "layers_ms": lm.layer_ms, "rest_ms": lm.rest_ms}
    if backend == "eager":
        info["eager"] = "LUT and timings on the inference copy: BatchNorm folded into convs, channels_last"
    if backend.endswith("-int8"):
        info["int8"] = table.env["int8"]
    if s.target.latency is not None:
        ratio, sel, _, probes = search_latency(units, scores, scope, overrides, s.layers.max_ratio, lm,
                                               s.target.latency)
    elif s.target.macs is not None:
        def macs_metric(sel: Selection) -> float:
            return macs_kept(graph, example_inputs, units, sel, macs_before)
        ratio, sel, _, probes = search_latency(units, scores, scope, overrides, s.layers.max_ratio, lm,
                                               s.target.macs, macs_metric, closest=True)
    else:
        ratio, probes = s.global_ratio, []
        sel = latency_select(units, scores, ratio, scope, overrides, s.layers.max_ratio, lm)
    if s.latency.context_groups > 0:  # the costliest groups' widths timed inside the whole network
        from prunekit.pruning.structured.latency_context import model_timer, refine_in_context
        from prunekit.pruning.structured.search import macs_kept

        sel, info["context"] = refine_in_context(
            graph, units, scores, sel, lm, s.latency.context_groups, s.layers.max_ratio,
            lambda sl: macs_kept(graph, example_inputs, units, sl, macs_before),
            model_timer(example_inputs, backend, s.latency.threads, max(s.latency.verify_runs, 10)))
    kept = kept_channels(units, sel)
    info["predicted_kept"] = lm.predict(kept) / lm.dense_ms
    pruned = lm.per_layer(kept)
    info["layers_pruned_ms"] = sum(pruned.values())
    info["per_layer"] = {n: [round(lc.full_ms, 4), round(pruned[n], 4), lc.spec.cin, lc.spec.cout]
                         for n, lc in lm.layers.items()}  # name -> [dense ms, pruned ms (table), cin, cout]
    log.info("latency-aware widths (%s, %d threads): predicted latency kept %.3f (table: %d timed, %d cached, "
             "%.0f s)", backend, s.latency.threads, info["predicted_kept"], table.measured, table.hits,
             table.build_seconds)
    return sel, ratio, probes, info


def verify_latency(dense: nn.Module, pruned: nn.Module, example_inputs: Any, backend: str, threads: int,
                   runs: int) -> dict[str, Any]:
    """Dense vs pruned timed alternately on the backend (eager: both as inference copies; onnxruntime-int8: both
    quantized): medians, kept, and the kept fraction's range over the rounds (the spread across repeats)."""
    from prunekit.measure.latency import compare_latency
    from prunekit.measure.latency_int8 import compare_int8_latency
    from prunekit.measure.latency_table import channels_last_inputs, inference_copy

    x, rounds = example_inputs, min(runs, 10)
    if backend == "eager":
        dense, _ = inference_copy(dense)
        pruned, _ = inference_copy(pruned)
        x = channels_last_inputs(example_inputs)
    models = {"dense": dense, "pruned": pruned}
    if backend.endswith("-int8"):
        st = compare_int8_latency(models, x, threads, runs=runs, rounds=rounds, backend=backend)
    else:
        st = compare_latency(models, x, backend, runs=runs, warmup=3, threads=threads, rounds=rounds)
    d, p = st["dense"], st["pruned"]
    per_round = [b / a for a, b in zip(d.round_medians_ms, p.round_medians_ms, strict=True) if a > 0]
    return {"dense_ms": d.median_ms, "pruned_ms": p.median_ms, "measured_kept": p.median_ms / d.median_ms,
            "measured_kept_range": [min(per_round), max(per_round)] if per_round else None, "runs": runs}

