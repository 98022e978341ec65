"""``target_macs``: search how many channels to remove until the pruned model keeps the target fraction of MACs.

Each probe applies a selection to a copy of the model (scores are computed once and reused) and counts the copy's
MACs with the real counter (on the meta device: shapes only). Global scope bisects the number of pooled channels
removed, in ranking order; when the target falls inside a single channel's MAC step (a wide early-stage channel
can weigh over 1% of a small model), that channel is kept and the ranking continues past it, so the target is met
within 1% wherever the model allows. Local scope bisects the per-layer ratio. The engine then applies the result
once to the real model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.errors import PruningError
from prunekit.measure import count_macs
from prunekit.pruning.structured.criteria.base import to_device
from prunekit.pruning.structured.graph import PruningGraph, Unit, copy_graph, strip_batchnorm
from prunekit.pruning.structured.selection import Selection, select
from prunekit.pruning.structured.settings import StructuredConfig

log = logging.getLogger(__name__)
MAX_PROBES = 80
MAX_SKIPS = 12


def count_macs_meta(graph: PruningGraph, example_inputs: Any) -> int:
    """``count_macs`` of ``graph.model`` computed on a meta copy (same counter, shapes only: no kernels run);
    on the real model when the model cannot run on the meta device."""
    try:
        return count_macs(strip_batchnorm(copy_graph(graph, meta=True).model), to_device(example_inputs, "meta"))
    except Exception:
        return count_macs(graph.model, example_inputs)


def macs_kept(graph: PruningGraph, example_inputs: Any, units: list[Unit], sel: Selection, macs_before: int) -> float:
    """Fraction of MACs kept when ``sel`` is applied (on a copy; ``graph.model`` is untouched)."""
    from prunekit.pruning.structured.apply import apply_selection

    try:  # on the meta device: shapes only, no weights copied, no kernels run
        g = copy_graph(graph, meta=True)
        apply_selection(g, units, sel)
        return count_macs(strip_batchnorm(g.model), to_device(example_inputs, "meta")) / macs_before
    except Exception:  # data-dependent ops cannot run on meta: prune and count a real copy
        g = copy_graph(graph)
        apply_selection(g, units, sel)
        return count_macs(g.model, example_inputs) / macs_before


@dataclass
class _Search:
    """The state of one ``target_macs`` search: every probe made, and the closest selection so far."""

    graph: PruningGraph
    example_inputs: Any
    units: list[Unit]
    scores: dict[str, torch.Tensor]  # float64 copies; skipped channels get +inf
    s: StructuredConfig
    overrides: dict[str, float]
    macs_before: int
    tol: float
    probes: list[tuple[float, float]] = field(default_factory=list)
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None  # (ratio, macs kept, scores)

    @property
    def target(self) -> float:
        return float(self.s.target.macs)

    def select(self, r: float) -> Selection:
        lay = self.s.layers
        return select(self.units, self.scores, r, lay.scope, self.overrides, lay.max_ratio, lay.round_to,
                      lay.round_to_wide)

    def probe(self, r: float) -> tuple[float, Selection]:
        sel = self.select(r)
        kept = macs_kept(self.graph, self.example_inputs, self.units, sel, self.macs_before)
        self.probes.append((r, kept))
        log.debug("target_macs search: ratio %.5f keeps %.4f of MACs", r, kept)
        if self.best is None or abs(kept - self.target) < abs(self.best[1] - self.target):
            self.best = (r, kept, {k: v.clone() for k, v in self.scores.items()})
        return kept, sel

    def ok(self, kept: float) -> bool:
        return abs(kept - self.target) <= self.tol * self.target

    def more(self) -> bool:
        return len(self.probes) < MAX_PROBES and not self.ok(self.best[1])


def _bisect_ratio(search: _Search) -> None:
    """Local scope (or nothing pooled): bisect the ratio itself."""
    lo, hi = 0.0, 1.0
    while search.more() and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        kept, _ = search.probe(mid)
        lo, hi = (mid, hi) if kept > search.target else (lo, mid)


def _bisect_pooled(search: _Search, total: int) -> None:
    """Global scope: bisect the number of pooled channels removed, in ranking order; where one more channel jumps
    over the target, keep that channel (infinite score) and continue down the ranking."""
    ratio_of = lambda n: n / total  # noqa: E731  (select() removes round(ratio * total) pooled channels)
    lo, hi, skips = 0, total, 0
    sel_lo = search.select(0.0)
    while search.more():
        if hi - lo > 1:
            mid = (lo + hi) // 2
            kept, sel = search.probe(ratio_of(mid))
            if kept > search.target:
                lo, sel_lo = mid, sel
            else:
                hi = mid
            continue
        if skips == MAX_SKIPS:
            break
        sel_hi = search.select(ratio_of(hi))
        jump = {(u, e) for u, es in sel_hi.removed.items() for e in es} - \
            {(u, e) for u, es in sel_lo.removed.items() for e in es}
        if not jump:
            break
        for u, e in jump:
            search.scores[u][e] = float("inf")
        skips += 1
        hi = total
    if skips:
        log.info("target_macs: kept %d channels whose removal would overshoot the target", skips)


def search_ratio(graph: PruningGraph, example_inputs: Any, units: list[Unit], scores: dict[str, torch.Tensor],
                 s: StructuredConfig, overrides: dict[str, float], macs_before: int,
                 tol: float = 0.01) -> tuple[float, dict[str, torch.Tensor], list[tuple[float, float]]]:
    """Find the selection whose pruned model keeps ``s.target.macs`` of the MACs (relative tolerance ``tol``).

    Returns ``(ratio, scores, probes)``: the ratio and the scores to select with (channels that were skipped
    because their MAC step overshoots the target get an infinite score), and the ``(ratio, macs_kept)`` probes.
    """
    search = _Search(graph, example_inputs, units, {k: v.clone().double() for k, v in scores.items()}, s,
                     overrides, macs_before, tol)
    target = search.target
    floor, _ = search.probe(1.0)  # every group at max_ratio: the fewest MACs this selection can reach
    if floor > target * (1 + tol):
        whole, reasons = graph.left_whole, []
        for k, v in list(whole.items())[:3]:
            v = v.split(";")[0]  # the reason, without the advice
            reasons.append(f"{k!r}: {v}" + ")" * (v.count("(") - v.count(")")))
        why = "; ".join(reasons)
        raise PruningError(f"target_macs {target} is out of reach: pruning every selected group to max_ratio "
                           f"{s.layers.max_ratio} still keeps {floor:.1%} of the MACs; raise max_ratio or prune more "
                           "layers" + (f" ({len(whole)} group(s) left whole, e.g. {why})" if whole else ""))
    search.best = (1.0, floor, search.scores)  # the live scores, as the skips below leave them
    total = sum(u.size for u in units if u.name not in overrides and u.attention is None)
    if s.layers.scope == "local" or total == 0:
        _bisect_ratio(search)
    else:
        _bisect_pooled(search, total)
    ratio, kept, scores = search.best
    if not search.ok(kept):
        log.warning("target_macs %.4f: the closest reachable is %.4f (ratio %.4f); the channels are too coarse to "
                    "come within 1%%", target, kept, ratio)
    else:
        log.info("target_macs %.4f: ratio %.4f keeps %.4f of MACs (%d probes)", target, ratio, kept,
                 len(search.probes))
    return ratio, scores, search.probes
