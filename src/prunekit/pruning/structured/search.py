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


def search_ratio(graph: PruningGraph, example_inputs: Any, units: list[Unit], scores: dict[str, torch.Tensor],
                 s: StructuredConfig, overrides: dict[str, float], macs_before: int,
                 tol: float = 0.01) -> tuple[float, dict[str, torch.Tensor], list[tuple[float, float]]]:
    """Find the selection whose pruned model keeps ``s.target.macs`` of the MACs (relative tolerance ``tol``).

    Returns ``(ratio, scores, probes)``: the ratio and the scores to select with (channels that were skipped
    because their MAC step overshoots the target get an infinite score), and the ``(ratio, macs_kept)`` probes.
    """
    target, lay = float(s.target.macs), s.layers
    probes: list[tuple[float, float]] = []
    scores = {k: v.clone().double() for k, v in scores.items()}

    def probe(r: float) -> tuple[float, Selection]:
        sel = select(units, scores, r, lay.scope, overrides, lay.max_ratio, lay.round_to, lay.round_to_wide)
        kept = macs_kept(graph, example_inputs, units, sel, macs_before)
        probes.append((r, kept))
        log.debug("target_macs search: ratio %.5f keeps %.4f of MACs", r, kept)
        return kept, sel

    floor, _ = probe(1.0)  # every group at max_ratio: the fewest MACs this selection can reach
    if floor > target * (1 + tol):
        raise PruningError(f"target_macs {target} is out of reach: pruning every selected group to max_ratio "
                           f"{lay.max_ratio} still keeps {floor:.1%} of the MACs; raise max_ratio or prune more layers")
    pooled = [u for u in units if u.name not in overrides and u.attention is None]
    total = sum(u.size for u in pooled)
    best = (1.0, floor, scores)
    ok = lambda kept: abs(kept - target) <= tol * target  # noqa: E731

    def better(r: float, kept: float) -> None:
        nonlocal best
        if abs(kept - target) < abs(best[1] - target):
            best = (r, kept, {k: v.clone() for k, v in scores.items()})
    if lay.scope == "local" or total == 0:  # bisect the ratio itself
        lo, hi = 0.0, 1.0
        while len(probes) < MAX_PROBES and not ok(best[1]) and hi - lo > 1e-6:
            mid = (lo + hi) / 2
            kept, _ = probe(mid)
            better(mid, kept)
            lo, hi = (mid, hi) if kept > target else (lo, mid)
    else:  # bisect the number of pooled channels removed, in ranking order
        ratio_of = lambda n: n / total  # noqa: E731  (select() removes round(ratio * total) pooled channels)
        lo, hi, skips = 0, total, 0
        sel_lo = select(units, scores, 0.0, lay.scope, overrides, lay.max_ratio, lay.round_to, lay.round_to_wide)
        while len(probes) < MAX_PROBES and not ok(best[1]):
            if hi - lo > 1:
                mid = (lo + hi) // 2
                kept, sel = probe(ratio_of(mid))
                better(ratio_of(mid), kept)
                if kept > target:
                    lo, sel_lo = mid, sel
                else:
                    hi = mid
                continue
            if skips == MAX_SKIPS:
                break
            # removing one more channel jumps over the target: keep that channel, continue down the ranking
            sel_hi = select(units, scores, ratio_of(hi), lay.scope, overrides, lay.max_ratio, lay.round_to,
                            lay.round_to_wide)
            jump = {(u, e) for u, es in sel_hi.removed.items() for e in es} - \
                {(u, e) for u, es in sel_lo.removed.items() for e in es}
            if not jump:
                break
            for u, e in jump:
                scores[u][e] = float("inf")
            skips += 1
            hi = total
        if skips:
            log.info("target_macs: kept %d channels whose removal would overshoot the target", skips)
    ratio, kept, scores = best
    if not ok(kept):
        log.warning("target_macs %.4f: the closest reachable is %.4f (ratio %.4f); the channels are too coarse to "
                    "come within 1%%", target, kept, ratio)
    else:
        log.info("target_macs %.4f: ratio %.4f keeps %.4f of MACs (%d probes)", target, ratio, kept, len(probes))
    return ratio, scores, probes
