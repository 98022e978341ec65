"""Which elements (channels or heads) of each unit to remove: a pure function of the scores.

``global`` scope ranks all units' elements together against one threshold; ``local`` removes the same fraction
from every unit. Per-unit overrides (``ratio_overrides``) and attention-head units are always local. No unit
loses more than ``max_ratio`` of its elements or its last one; kept channel counts are rounded to ``round_to``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from prunekit.pruning.structured.graph import Unit


@dataclass
class Selection:
    removed: dict[str, list[int]]  # unit name -> element indices to remove (sorted)
    capped: list[str] = field(default_factory=list)  # units held at max_ratio
    shortfall: int = 0  # elements the global ranking could not remove because every unit hit its cap

    def count(self) -> int:
        return sum(len(v) for v in self.removed.values())


def keep_count(size: int, ratio: float) -> int:
    return int(math.floor(size * (1.0 - ratio) + 0.5))


def max_removable(unit: Unit, max_ratio: float) -> int:
    """Elements that may go: at most ``max_ratio`` (or the unit's own lower cap) of them, and never the last one."""
    if unit.max_ratio is not None:
        max_ratio = min(max_ratio, unit.max_ratio)
    min_keep = max(1, math.ceil(unit.size * (1.0 - max_ratio) - 1e-9))
    return max(0, unit.size - min_keep)


def _round_kept(unit: Unit, kept: int, cap: int, round_to: int | None, round_to_wide: int | None = None) -> int:
    """Round the kept element count so that kept channels are a multiple of round_to (and of unit.multiple_of);
    a unit keeping at least ``round_to_wide`` channels is rounded to a multiple of ``round_to_wide`` instead."""
    if unit.attention is not None:
        return kept
    step_ch = math.lcm(round_to or 1, unit.multiple_of)
    if round_to_wide and kept * (unit.channels // unit.size) >= round_to_wide:
        step_ch = math.lcm(round_to_wide, unit.multiple_of)
    step = step_ch // math.gcd(step_ch, unit.ch_groups)  # in elements
    if step <= 1:
        return kept
    if unit.size < step:
        return unit.size  # too small to round: left whole
    rounded = max(step, int(math.floor(kept / step + 0.5)) * step)
    if unit.size - rounded > cap:  # rounding down would exceed max_ratio: round up instead
        rounded += step
    return min(rounded, unit.size)


def _rank_pooled(pool: list[Unit], scores: dict[str, torch.Tensor], caps: dict[str, int],
                 ratio: float) -> tuple[list[int], int]:
    """Global ranking: ``(elements taken from each pooled unit, elements left untaken because every unit hit its
    cap)`` when ``ratio`` of all pooled elements go, the lowest scores first."""
    total = sum(u.size for u in pool)
    left = total - keep_count(total, ratio)
    flat = torch.cat([scores[u.name].float() for u in pool])  # (sum of sizes,)
    owner = torch.cat([torch.full((u.size,), i, dtype=torch.long) for i, u in enumerate(pool)])
    order = torch.sort(flat, stable=True).indices
    taken = [0] * len(pool)
    for i in owner[order].tolist():  # ascending score: remove the least important first
        if left == 0:
            break
        if taken[i] < caps[pool[i].name]:
            taken[i] += 1
            left -= 1
    return taken, left


def select(units: list[Unit], scores: dict[str, torch.Tensor], ratio: float, scope: str = "global",
           overrides: dict[str, float] | None = None, max_ratio: float = 0.9, round_to: int | None = None,
           round_to_wide: int | None = None) -> Selection:
    """Elements to remove per unit.

    Args:
        units: the prunable units.
        scores: unit name -> per-element scores (higher = kept).
        ratio: fraction of elements to remove (global: of all pooled elements; local: of each unit).
        scope: ``"global"`` or ``"local"``.
        overrides: unit name -> its own ratio (ranked locally).
        max_ratio: no unit loses more than this fraction of its elements.
        round_to: kept channels rounded to a multiple of this.
        round_to_wide: units keeping at least this many channels are rounded to a multiple of it instead (ONNX
            Runtime's CPU convolutions compute output channels in sets of four SIMD blocks).
    """
    overrides = overrides or {}
    counts: dict[str, int] = {}
    caps = {u.name: max_removable(u, max_ratio) for u in units}
    capped: list[str] = []
    pool: list[Unit] = []
    for u in units:
        r = overrides.get(u.name)
        if r is None and (scope == "local" or u.attention is not None):
            r = ratio
        if r is None:
            pool.append(u)
            continue
        want = u.size - keep_count(u.size, r)
        if want > caps[u.name]:
            capped.append(u.name)
        counts[u.name] = min(want, caps[u.name])

    shortfall = 0
    if pool:
        taken, shortfall = _rank_pooled(pool, scores, caps, ratio)
        for i, u in enumerate(pool):
            counts[u.name] = taken[i]
            if taken[i] == caps[u.name] and taken[i] > 0:
                capped.append(u.name)

    removed: dict[str, list[int]] = {}
    for u in units:
        n = counts[u.name]
        kept = _round_kept(u, u.size - n, caps[u.name], round_to, round_to_wide)
        n = u.size - kept
        if n > 0:
            order = torch.sort(scores[u.name].float(), stable=True).indices
            removed[u.name] = sorted(order[:n].tolist())
    return Selection(removed=removed, capped=capped, shortfall=shortfall)
