"""Lifecycle steps 2-3, calibrate and score: statistics on the calibration data, then one score per channel (or
head) of every group. A group the criterion cannot score is left whole with a warning; the rest go on."""

from __future__ import annotations

import logging
from typing import Any

import torch

from prunekit.errors import PruningError
from prunekit.pruning.structured.criteria.base import CalibContext, Criterion
from prunekit.pruning.structured.graph import PruningGraph, Unit

log = logging.getLogger(__name__)


def collect(ctx: CalibContext, graph: PruningGraph, covariance: bool) -> dict:
    """Channel statistics of the target layers on the calibration data, merged across torchrun ranks."""
    from prunekit.pruning.structured.stats import collect_stats, sync_stats

    stats = collect_stats(ctx.model, ctx.calib_data, ctx.targets, max_batches=ctx.max_batches, device=ctx.device,
                          covariance=covariance, graph=graph)
    return sync_stats(stats)  # torchrun: merged by module name across ranks (a no-op in one process)


def score_units(crit: Criterion, units: list[Unit], normalize: str = "none",
                left_whole: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Unit name -> per-element scores (channels, or heads), optionally normalised per unit.

    With ``left_whole`` (a dict), a unit the criterion cannot score (``PruningError``, e.g. no statistics reach
    a layer of its group) is recorded there with the reason and skipped; without it, the error propagates.
    """
    out = {}
    for u in units:
        try:
            s = u.element_scores(crit(u.group))
        except PruningError as e:
            if left_whole is None:
                raise
            left_whole[u.name] = f"not scored: {e}"
            continue
        if normalize != "none":
            d = s.mean() if normalize == "mean" else s.abs().max()
            s = s / d if d > 0 else s
        out[u.name] = s
    return out


def scored(units: list[Unit], scores: dict[str, Any], left_whole: dict[str, str]) -> list[Unit]:
    """The units that have scores; the others were left whole (said once, loudly)."""
    kept = [u for u in units if u.name in scores]
    dropped = [u.name for u in units if u.name not in scores]
    if dropped:
        log.warning("%d groups left whole: the criterion cannot score them (%s)%s", len(dropped),
                    left_whole[dropped[0]][:300], f"; also {', '.join(dropped[1:8])}" if len(dropped) > 1 else "")
    if not kept:
        raise PruningError(f"no group can be scored: {left_whole[dropped[0]]}")
    return kept
