"""Sweeps: one recipe run over a grid (or an Optuna search) of settings, resumably, with a Pareto front.

Example:
    >>> from prunekit.pipeline.sweep import run_sweep
    >>> res = run_sweep("recipe.yaml", {"prune.criterion": ["l1", "taylor"], "prune.ratio": [0.3, 0.5]},
    ...                 "runs/sweep", jobs=2)
    >>> res.best["point"]  # highest top-1 among points with >= 40% MACs cut and <= 1.5 points top-1 drop
    '004-criterion=taylor,ratio=0.5'

Each point is a recipe of its own, run as ``python -m prunekit run POINT/recipe.yaml --resume`` in a child process,
so points run in parallel (``jobs``) and a killed sweep loses at most the epoch in progress. Points whose baseline
stage options are equal share one baseline run, trained once. The sweep folder::

    sweep.json                       the resolved recipe (after overrides), search space, objectives, targets
    baselines/<hash>/1-baseline/     one shared baseline run per distinct set of baseline options
    points/003-criterion=l1,ratio=0.5/   recipe.yaml, point.json (status, error, times), output.log, stage runs
    results.csv, results.json        every point's settings and metrics, the Pareto front, the best point
    pareto.png                       top-1 vs MACs (and vs latency where measured)
    study.db                         the Optuna study (search="optuna"), so that a search resumes too

Running the same sweep again skips finished points, resumes interrupted ones and (by default) retries failed ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prunekit._io import atomic_write_json
from prunekit.errors import ConfigError, RunDirError
from prunekit.pipeline.sweep.points import Point, Sweep
from prunekit.pipeline.sweep.runner import Runner, run_grid, sweep_lock
from prunekit.pipeline.sweep.search import constraint_values, run_search
from prunekit.pipeline.sweep.space import (
    OBJECTIVES,
    Range,
    check_objectives,
    import_optuna,
    parse_grid,
    resolve_key,
)
from prunekit.report.sweep import SweepResult, collect_results, meets, point_row, read_json, write_results
from prunekit.report.targets import DEFAULT_TARGETS, TARGETS, check_targets, describe_targets

__all__ = ["DEFAULT_TARGETS", "OBJECTIVES", "TARGETS", "Range", "SweepResult", "check_objectives", "check_targets",
           "collect_results", "constraint_values", "describe_targets", "meets", "parse_grid", "point_row",
           "resolve_key", "run_sweep", "write_results"]

log = logging.getLogger(__name__)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _check_args(search: str, trials: int | None, jobs: int) -> None:
    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search {search!r}: choose grid or optuna")
    if search == "optuna" and not trials:
        raise ConfigError("--search optuna needs --trials N (the number of trials in all)")
    if search == "grid" and trials is not None:
        raise ConfigError("--trials is only for --search optuna; a grid runs every combination")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be at least 1")


def _state(sweep: Sweep, out: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The content of ``sweep.json``; refuses an ``--out`` that holds something else or a sweep of another recipe."""
    state = json.loads(json.dumps({
        "recipe": str(sweep.path), "base": {k: v for k, v in sweep.base.to_dict().items() if k != "out"},
        "space": {k: [str(v) if isinstance(v, Range) else v for v in vs] for k, vs in sweep.space.items()},
        **settings}, default=str))
    prev = read_json(sweep.out / "sweep.json")
    if prev is None and sweep.out.is_dir() and any(sweep.out.iterdir()):
        raise RunDirError(f"--out {str(out)!r} holds files but no sweep.json; choose another --out")
    if prev is not None and prev.get("base") != state["base"]:
        keys = _diff(prev.get("base"), state["base"])
        raise ConfigError(f"--out {str(out)!r} holds a sweep of a different recipe (differs at: "
                          f"{', '.join(keys[:5])}); choose another --out, or restore the recipe to resume")
    return state


def _logger(out: Path, targets: dict[str, float]) -> Callable[[Point], None]:
    """``on_done(point)``: log the point's result and rewrite ``results.json`` / ``results.csv``."""

    def on_done(p: Point) -> None:
        r = point_row(out, p.dir, p.info)
        if r["status"] == "ok":
            log.info("sweep: %s: top1 %.2f%% (drop %+.2f), MACs cut %.1f%% (%.0f s)", p.name, r.get("top1", 0),
                     r.get("top1_drop", math.nan), 100 * r.get("macs_reduction", math.nan), r.get("seconds", 0))
        else:
            log.error("sweep: %s FAILED: %s", p.name, r.get("error"))
        write_results(out, targets, plot=False)

    return on_done


def run_sweep(recipe: str | Path | None, grid: Mapping[str, Sequence[Any]] | Sequence[str], out: str | Path, *,
              search: str = "grid", trials: int | None = None, objectives: Sequence[str] = ("top1",),
              targets: Mapping[str, float] | None = None, jobs: int = 1, overrides: Mapping[str, Any] | None = None,
              retry_failed: bool = True) -> SweepResult:
    """Run ``recipe`` over ``grid`` (every combination) or an Optuna TPE search over it; resumable.

    Args:
        recipe: recipe YAML (None: the embedded demo recipe).
        grid: ``{"prune.ratio": [0.3, 0.5], ...}`` or ``["prune.ratio=0.3,0.5", ...]``; keys are dotted recipe keys
            (``stages.prune.ratio`` or ``prune.ratio``, ``data.batch_size``, ``seed``). With ``search="optuna"`` the
            values are choices, or one ``Range`` (``"KEY=LO:HI[:log]"``).
        out: the sweep folder; running the same sweep again resumes it.
        search: ``"grid"`` or ``"optuna"`` (needs ``trials``; study kept in ``out/study.db``).
        trials: Optuna trials in all (rerun with more to extend the search).
        objectives: Optuna objectives (``OBJECTIVES``); two or more give a multi-objective TPE search.
        targets: what the best point must meet (default ``DEFAULT_TARGETS``: >= 40% MACs cut, <= 1.5 points top-1
            drop); with Optuna they are the sampler's constraints. ``{}``: none.
        jobs: points run at once, one child process each.
        overrides: fixed recipe overrides applied before sweeping (like ``prunekit run --set``).
        retry_failed: rerun points that failed in an earlier run of the sweep.

    Returns:
        The ``SweepResult`` also written to ``out/results.json``.

    Example:
        >>> run_sweep("recipe.yaml", ["prune.ratio=0.3,0.5"], "runs/sweep").front
    """
    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search {search!r}: choose grid or optuna")
    if search == "optuna" and not trials:
        raise ConfigError("--search optuna needs --trials N (the number of trials in all)")
    _check_args(search, trials, jobs)
    objectives = check_objectives(objectives)
    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    space = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
    if not space:
        raise ConfigError("--grid: give at least one KEY=V1,V2,... (e.g. stages.prune.ratio=0.3,0.5)")
    if search == "optuna":
        import_optuna()
    sweep = Sweep(recipe, space, Path(out), search, overrides)  # every point validated here, before any run
    state = _state(sweep, out, {"search": search, "trials": trials, "objectives": objectives, "targets": targets})
    if jobs > (os.cpu_count() or 1):
        log.warning("sweep: --jobs %d is more than the %d CPU cores", jobs, os.cpu_count() or 1)
    sweep.out.mkdir(parents=True, exist_ok=True)
    with sweep_lock(sweep.out):
        atomic_write_json(sweep.out / "sweep.json", state)
        runner, on_done = Runner(jobs), _logger(sweep.out, targets)
        if search == "grid":
            run_grid(sweep, runner, retry_failed, on_done)
        else:
            run_search(sweep, runner, trials or 0, objectives, targets, retry_failed, on_done)
        return write_results(sweep.out, targets)
