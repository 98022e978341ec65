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

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from prunekit import runs
from prunekit._io import atomic_write_json, atomic_write_text
from prunekit.config import read_yaml
from prunekit.errors import ConfigError, RunDirError, closest
from prunekit.pipeline.recipe import (
    DEMO_RECIPE,
    STAGES,
    Recipe,
    check_override,
    is_finished,
    set_dotted,
    stage_configs,
    stage_dirs,
)
from prunekit.report.pareto import pareto_front
from prunekit.report.targets import DEFAULT_TARGETS, TARGETS, check_targets, describe_targets, meets_targets

log = logging.getLogger(__name__)

# objective -> (results column, Optuna direction)
OBJECTIVES = {"top1": ("top1", "maximize"), "top5": ("top5", "maximize"), "drop": ("top1_drop", "minimize"),
              "macs": ("macs", "minimize"), "params": ("params", "minimize"), "latency": ("latency_ms", "minimize")}
_SET_BY_SWEEP = ("out", "resume", "overwrite")
_TOP_KEYS = ("seed", "device")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Range:
    """A search range (``search="optuna"`` only): ``KEY=LO:HI`` uniform, ``KEY=LO:HI:log`` log-uniform; two ints
    give integers."""

    low: float
    high: float
    log: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}" + (":log" if self.log else "")


@dataclass
class SweepResult:
    """What ``run_sweep`` / ``collect_results`` return (the content of ``results.json``)."""

    out: Path
    points: list[dict[str, Any]]  # one row per point: point, status, settings, metrics, ...
    front: list[str]  # names of the points on the top-1 vs MACs Pareto front, by MACs
    best: dict[str, Any] | None  # the highest top-1 among the points meeting the targets
    targets: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.points if p["status"] != "ok"]


# ------------------------------------------------------------------------------------------------ grid parsing
def _parse_value(tok: str) -> Any:
    parts = [p.strip() for p in tok.split(":")]
    if len(parts) in (2, 3) and all(_NUMBER.fullmatch(p) for p in parts[:2]) and parts[2:] in ([], ["log"]):
        lo, hi = (int(p) if p.lstrip("+-").isdigit() else float(p) for p in parts[:2])
        if not lo < hi or (len(parts) == 3 and lo <= 0):
            raise ConfigError(f"--grid: range {tok!r} needs LO < HI (and LO > 0 with :log)")
        return Range(lo, hi, len(parts) == 3)
    if _NUMBER.fullmatch(tok):  # YAML 1.1 reads 1e-3 as a string
        return int(tok) if tok.lstrip("+-").isdigit() else float(tok)
    try:
        return yaml.safe_load(tok)
    except yaml.YAMLError:
        return tok


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["prune.ratio=0.3,0.5", "prune.criterion=l1,taylor"]`` -> ``{"prune.ratio": [0.3, 0.5], ...}``.

    A token without ``=`` continues the previous key, so one item may hold several keys (``a=1,2,b=x,y``). Values
    are YAML scalars (``0.5``, ``1e-3``, ``true``, ``null``, ``l1``); ``LO:HI`` and ``LO:HI:log`` are ``Range``s.
    """
    grid: dict[str, list[Any]] = {}
    key: str | None = None
    for tok in (t.strip() for item in items for t in str(item).split(",")):
        if not tok:
            continue
        if "=" in tok:
            key, tok = (s.strip() for s in tok.split("=", 1))
            if not key:
                raise ConfigError(f"--grid: {'=' + tok!r} has no key; expected KEY=V1,V2,...")
            if key in grid:
                raise ConfigError(f"--grid: key {key!r} is given twice; give all its values once: {key}=V1,V2,...")
            grid[key] = []
            if not tok:
                continue
        elif key is None:
            raise ConfigError(f"--grid: {tok!r} is not KEY=V1,V2,... (e.g. stages.prune.ratio=0.3,0.5)")
        grid[key].append(_parse_value(tok))
    return grid


def resolve_key(key: str, recipe: Recipe) -> str:
    """The full dotted recipe key of a grid key: ``prune.ratio`` -> ``stages.prune.ratio``; unknown keys raise."""
    parts = key.split(".")
    forms = "keys are stages.STAGE.OPTION (or STAGE.OPTION), data.KEY, seed or device"
    if not all(parts):
        raise ConfigError(f"--grid {key!r}: not a dotted key; {forms}")
    if parts[0] in _TOP_KEYS and len(parts) == 1:
        return key
    if parts[0] == "data":
        from prunekit.data import DataArgs

        valid = DataArgs.keys()
        if len(parts) != 2 or parts[1] not in valid:
            near = closest(parts[-1], valid)
            hint = f"; did you mean 'data.{near[0]}'?" if near else ""
            raise ConfigError(f"--grid {key!r}: unknown data key{hint} Valid: {', '.join('data.' + k for k in valid)}")
        return key
    if parts[0] != "stages":
        if parts[0] not in recipe.stages and parts[0] not in STAGES:
            near = closest(parts[0], [*recipe.stages, "data", *_TOP_KEYS])
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--grid {key!r}: {parts[0]!r} is not a stage of the recipe{hint} ({forms}; "
                              f"the recipe's stages: {', '.join(recipe.stages)})")
        parts = ["stages", *parts]
    if len(parts) < 3:
        raise ConfigError(f"--grid {key!r}: name a stage and one of its options, e.g. stages.prune.ratio")
    stage, option = parts[1], parts[2]
    if stage not in recipe.stages:
        near = closest(stage, recipe.stages)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--grid {key!r}: the recipe has no stage {stage!r}{hint} "
                          f"(its stages: {', '.join(recipe.stages)})")
    valid = STAGES.get(stage).config.keys()
    if option not in valid:
        near = closest(option, valid)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--grid {key!r}: stage {stage!r} has no option {option!r}{hint} "
                          f"Valid options: {', '.join(valid)}")
    if option in _SET_BY_SWEEP:
        raise ConfigError(f"--grid {key!r}: {option!r} is set by the sweep for every point and cannot be swept")
    return ".".join(parts)


def check_objectives(objectives: Sequence[str]) -> list[str]:
    """Validate Optuna objectives: one or more of ``OBJECTIVES``, each at most once."""
    objectives = list(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives or len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objectives {','.join(objectives)!r}: give one or more distinct names of "
                          f"{', '.join(OBJECTIVES)}")
    return objectives


# ------------------------------------------------------------------------------------------------ points
@dataclass
class _Baseline:
    dir: Path
    recipe: Recipe
    status: str = "pending"  # pending | running | ok | failed
    error: str | None = None

    @property
    def run_dir(self) -> Path:
        return stage_dirs(self.recipe)["baseline"]


@dataclass
class _Point:
    index: int
    name: str
    settings: dict[str, Any]
    recipe: Recipe
    baseline: _Baseline | None
    info: dict[str, Any]  # point.json
    trials: list[int] = field(default_factory=list)  # Optuna trials waiting for this point
    active: bool = False  # queued or running (Optuna: a repeated suggestion waits for it)

    @property
    def dir(self) -> Path:
        return Path(self.recipe.out)

    def done(self) -> bool:
        return self.info.get("status") == "ok" and (self.dir / self.info["final_dir"] / runs.METRICS).is_file()


def _key(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others (``ratio``, ``finetune.lr``)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if sum(o.split(".")[-n:] == parts[-n:] for o in keys) == 1:
                break
        out[k] = s
    return out


def _fmt(v: Any) -> str:
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


class _Sweep:
    def __init__(self, recipe: str | Path | None, space: Mapping[str, Sequence[Any]], out: Path, search: str,
                 overrides: Mapping[str, Any] | None):
        self.path = Path(recipe) if recipe is not None else DEMO_RECIPE
        self.data = read_yaml(self.path, what="recipe")
        for k, v in (overrides or {}).items():
            check_override(k, self.data)
            set_dotted(self.data, k, v)
        self.out = Path(out).resolve()
        self.base = self._build({}, "recipe")
        self.space: dict[str, list[Any]] = {}
        for key, values in space.items():
            full = resolve_key(key, self.base)
            if full in self.space:
                raise ConfigError(f"--grid: {key!r} and another key both name {full!r}; give it once")
            values = list(dict.fromkeys(values if isinstance(values, (list, tuple)) else [values]))  # dedupe
            if not values:
                raise ConfigError(f"--grid {key!r}: no values; expected {key}=V1,V2,...")
            self.space[full] = values
        self._check_values(search)
        self.short = _short_names(list(self.space))
        self.baselines: dict[str, _Baseline] = {}
        self.points: dict[str, _Point] = {}
        self.known = {_key(i["settings"]): (i["index"], d.name) for d, i in _scan_points(self.out)}

    def _build(self, settings: Mapping[str, Any], where: str, mutate: Callable[[dict], None] | None = None) -> Recipe:
        data = copy.deepcopy(self.data)
        try:
            for k, v in settings.items():
                set_dotted(data, k, v)
            if mutate:
                mutate(data)
            recipe = Recipe.build(data, source=str(self.path))
            stage_configs(recipe)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where != "recipe" else str(e)) from None
        return recipe

    def _check_values(self, search: str) -> None:
        """Every value alone, then (for a grid) every combination: a bad value fails before anything runs."""
        for key, values in self.space.items():
            for v in values:
                if isinstance(v, Range):
                    if search != "optuna":
                        raise ConfigError(f"--grid {key}={v}: a range needs --search optuna; for a grid give values "
                                          f"{key}=V1,V2,...")
                    if len(values) > 1:
                        raise ConfigError(f"--grid {key}: give either one range LO:HI or a list of values, not both")
                    for end in (v.low, v.high):
                        self._build({key: end}, f"--grid {key}={v}")
                    continue
                if search == "optuna" and not (v is None or isinstance(v, (bool, int, float, str))):
                    raise ConfigError(f"--grid {key}={v!r}: Optuna takes only scalar choices (number, string, bool)")
                self._build({key: v}, f"--grid {key}={v!r}")
        if search == "grid":
            for settings in self.grid_points():
                self._build(settings, f"--grid point {', '.join(f'{k}={v!r}' for k, v in settings.items())}")

    def grid_points(self) -> Iterator[dict[str, Any]]:
        for combo in itertools.product(*self.space.values()):
            yield dict(zip(self.space, combo))

    # -- baselines shared between points
    def _shared_baseline(self, settings: dict[str, Any], full: Recipe) -> _Baseline | None:
        names = list(full.stages)
        if names[0] != "baseline" or len(names) < 2 or "from" in full.stages["baseline"]:
            return None
        nxt = names[1]
        if "from" not in STAGES.get(nxt).config.keys() or "from" in full.stages[nxt]:
            return None
        cfg = stage_configs(full)["baseline"].to_dict()
        ident = {k: v for k, v in cfg.items() if k not in _SET_BY_SWEEP}
        key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
        if key not in self.baselines:
            d = self.out / "baselines" / key

            def only_baseline(data: dict) -> None:
                data["stages"] = {"baseline": data["stages"]["baseline"]}
                data["out"] = str(d)

            b = _Baseline(d, self._build(settings, f"baseline {key}", mutate=only_baseline))
            b.status = "ok" if is_finished(b.run_dir) else "pending"
            self.baselines[key] = b
        return self.baselines[key]

    def point(self, settings: dict[str, Any]) -> _Point:
        """The point of ``settings`` (one object per distinct settings, reusing its folder from an earlier run)."""
        key = _key(settings)
        if key in self.points:
            return self.points[key]
        where = f"point {', '.join(f'{k}={v!r}' for k, v in settings.items())}"
        full = self._build(settings, where)
        if key in self.known:
            index, name = self.known[key]
        else:
            index = max([i for i, _ in self.known.values()], default=0) + 1
            label = ",".join(f"{self.short.get(k, k)}={_fmt(v)}" for k, v in settings.items())
            name = f"{index:03d}-{label}"[:100]
            self.known[key] = (index, name)
        d = self.out / "points" / name
        base = self._shared_baseline(settings, full)

        def reroute(data: dict) -> None:
            data["out"] = str(d)
            if base is None:
                return
            stages = data["stages"]
            names = list(stages)
            del stages["baseline"]
            for n in names[1:]:  # the stages up to the first that writes a run read the shared baseline
                stages[n] = {**(stages[n] or {}), "from": str(base.run_dir)}
                if STAGES.get(n).writes_run:
                    break

        recipe = self._build(settings, where, mutate=reroute)
        cfgs = stage_configs(recipe)
        dirs = stage_dirs(recipe)
        final = [n for n, c in cfgs.items() if "out" in type(c).keys()][-1]
        if base is not None:
            baseline_dir: Path | None = base.run_dir
        elif "baseline" in recipe.stages and "from" not in recipe.stages["baseline"]:
            baseline_dir = dirs["baseline"]
        else:
            baseline_dir = getattr(next(iter(cfgs.values())), "from_dir", None)
        info = _read_json(d / "point.json") or {"status": "pending", "runs": 0}
        info.update(point=name, index=index, settings=settings, final_dir=str(dirs[final].relative_to(d)),
                    baseline_dir=str(baseline_dir) if baseline_dir else None)
        p = _Point(index, name, settings, recipe, base, info)
        self.points[key] = p
        return p

    # -- running
    def pick(self, queue: list[_Point], on_done: Callable[[_Point], None]) -> _Point | _Baseline | None:
        """The next job: the first queued point whose baseline is ready, else a baseline a queued point needs."""
        for p in list(queue):
            b = p.baseline
            if b is None or b.status == "ok":
                queue.remove(p)
                return p
            if b.status == "failed":
                queue.remove(p)
                self.record(p, "failed", f"its baseline run {b.run_dir} failed: {b.error}")
                on_done(p)
            elif b.status == "pending":
                b.status = "running"
                return b
        return None

    def record(self, p: _Point, status: str, error: str | None = None, seconds: float | None = None,
               pid: int | None = None) -> None:
        p.info.update(status=status, error=error, pid=pid)
        if status == "running":
            p.info.update(started=_now(), runs=p.info.get("runs", 0) + 1, finished=None, seconds=None)
        elif seconds is not None:
            p.info.update(finished=_now(), seconds=round(seconds, 2))
        atomic_write_json(p.dir / "point.json", p.info)

    def execute(self, runner: _Runner, queue: list[_Point], pull: Callable[[], _Point | None] | None,
                on_done: Callable[[_Point], None]) -> None:
        """Run ``queue`` (and what ``pull`` hands out while slots are free) with at most ``runner.jobs`` children."""
        exhausted = pull is None
        try:
            while True:
                while runner.free():
                    job = self.pick(queue, on_done)
                    if job is None and not queue and not exhausted:
                        p = pull()  # type: ignore[misc]
                        exhausted = p is None
                        queue += [p] if p is not None else []
                        continue
                    if job is None:
                        break
                    pid = runner.start(job, job.recipe)
                    if isinstance(job, _Point):
                        self.record(job, "running", pid=pid)
                        log.info("sweep: %s started", job.name)
                    else:
                        log.info("sweep: training the shared baseline %s", job.run_dir)
                if not runner.procs:
                    if queue or not exhausted:
                        continue
                    return
                for job, rc, error, seconds in runner.wait():
                    self._finished(job, rc, error, seconds, on_done)
        except BaseException:
            for job in runner.stop():
                if isinstance(job, _Point):
                    self.record(job, "interrupted", "the sweep was interrupted; rerun it to resume this point")
            raise

    def _finished(self, job: _Point | _Baseline, rc: int, error: str | None, seconds: float,
                  on_done: Callable[[_Point], None]) -> None:
        if isinstance(job, _Baseline):
            ok = rc == 0 and is_finished(job.run_dir)
            job.status, job.error = ("ok", None) if ok else ("failed", error or "incomplete run directory")
            log.log(logging.INFO if ok else logging.ERROR, "sweep: baseline %s %s (%.0f s)", job.run_dir,
                    "finished" if ok else f"FAILED: {job.error}", seconds)
            return
        ok = rc == 0 and (job.dir / job.info["final_dir"] / runs.METRICS).is_file()
        self.record(job, "ok" if ok else "failed", None if ok else error or "no metrics.json written", seconds)
        on_done(job)

    def run_grid(self, runner: _Runner, retry_failed: bool, on_done: Callable[[_Point], None]) -> None:
        points = [self.point(s) for s in self.grid_points()]
        todo = [p for p in points if not p.done() and (retry_failed or p.info.get("status") != "failed")]
        bases = {b.dir for p in todo if (b := p.baseline) is not None and b.status != "ok"}
        log.info("sweep: %d points (%s) in %s: %d done, %d to run, %d shared baseline(s) to train, %d job(s)",
                 len(points), " x ".join(str(len(v)) for v in self.space.values()), self.out,
                 len(points) - len(todo), len(todo), len(bases), runner.jobs)
        self.execute(runner, todo, None, on_done)

    def run_search(self, runner: _Runner, trials: int, objectives: list[str], targets: dict[str, float],
                   retry_failed: bool, on_done: Callable[[_Point], None]) -> None:
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        state = optuna.trial.TrialState
        per_trial = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5; older ones take constraints_func
        constraints: dict[int, list[float]] = {}
        sampler = optuna.samplers.TPESampler(seed=self.base.seed, constant_liar=runner.jobs > 1, constraints_func=(
            lambda t: constraints[t.number]) if targets and not per_trial else None)
        directions = [OBJECTIVES[o][1] for o in objectives]
        study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{self.out / 'study.db'}",
                                    load_if_exists=True, directions=directions, sampler=sampler)
        if [d.name.lower() for d in study.directions] != directions:
            raise ConfigError(f"--objectives {','.join(objectives)}: the study in {self.out / 'study.db'} has "
                              f"{len(study.directions)} objective(s) of other directions; choose another --out")
        # trials left RUNNING by a killed sweep: close them and ask their settings again (the point resumes)
        requeued = list(study.user_attrs.get("requeued", []))
        for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            study.enqueue_trial(t.params, skip_if_exists=False)
            study.tell(t.number, state=state.FAIL, skip_if_finished=True)
            requeued.append(t.number)
        study.set_user_attr("requeued", requeued)
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        budget = trials - (len(finished) - len(requeued))
        log.info("sweep: Optuna TPE (%s) in %s: %d trial(s) done, %d to run, %d job(s)",
                 ", ".join(f"{o}: {d}" for o, d in zip(objectives, directions)), self.out,
                 len(finished) - len(requeued), max(budget, 0), runner.jobs)
        asked: dict[int, Any] = {}

        def tell(p: _Point) -> None:
            row = point_row(self.out, p.dir, p.info)
            values = [row.get(OBJECTIVES[o][0]) for o in objectives]
            for n in p.trials:
                if row["status"] != "ok" or any(v is None for v in values):
                    if row["status"] == "ok":
                        log.error("sweep: trial %d FAILED: %s has no %s", n, p.name, ", ".join(
                            OBJECTIVES[o][0] for o, v in zip(objectives, values) if v is None))
                    study.tell(n, state=state.FAIL, skip_if_finished=True)
                    continue
                cons = constraint_values(row, targets)
                if per_trial:
                    for name, c in zip(targets, cons):
                        asked[n].set_constraint(name, c)
                constraints[n] = cons
                study.tell(n, values, skip_if_finished=True)
            p.trials.clear()
            on_done(p)

        def pull() -> _Point | None:
            nonlocal budget
            while budget > 0:
                budget -= 1
                trial = study.ask()
                asked[trial.number] = trial
                settings = {k: _suggest(trial, k, v) for k, v in self.space.items()}
                try:
                    p = self.point(settings)
                except ConfigError as e:
                    log.error("sweep: trial %d FAILED before it ran: %s", trial.number, e)
                    study.tell(trial, state=state.FAIL)
                    continue
                trial.set_user_attr("point", p.name)
                p.trials.append(trial.number)
                p.info["trials"] = sorted({*p.info.get("trials", []), trial.number})
                if p.dir.is_dir():
                    atomic_write_json(p.dir / "point.json", p.info)
                if p.active:  # the same settings are already queued or running
                    continue
                if p.done() or (not retry_failed and p.info.get("status") == "failed"):
                    tell(p)
                    continue
                p.active = True
                return p
            return None

        def done(p: _Point) -> None:
            p.active = False
            tell(p)

        self.execute(runner, [], pull, done)


def _suggest(trial: Any, key: str, space: list[Any]) -> Any:
    if isinstance(space[0], Range):
        r = space[0]
        if r.integer:
            return trial.suggest_int(key, r.low, r.high, log=r.log)
        return trial.suggest_float(key, r.low, r.high, log=r.log)
    return trial.suggest_categorical(key, space)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs Optuna: pip install 'prunekit[sweep]' (or pip install optuna)") \
            from None
    return optuna


# ------------------------------------------------------------------------------------------------ child processes
def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) asking the kernel to SIGTERM the child when the sweep process dies, even by SIGKILL:
    an orphaned point must not keep writing while a rerun resumes it. ``prctl`` is looked up here, in the parent, so
    the forked child imports nothing before ``exec``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import signal

        prctl, sigterm = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGTERM)
    except (OSError, AttributeError):
        return None

    def fn() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)

    return fn


class _Runner:
    """At most ``jobs`` children ``python -m prunekit run RECIPE --resume``, their output in ``output.log``."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.procs: dict[subprocess.Popen, tuple[Any, Path, int, float]] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if jobs > 1 and "OMP_NUM_THREADS" not in self.env:  # share the cores instead of oversubscribing them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def free(self) -> bool:
        return len(self.procs) < self.jobs

    def start(self, job: Any, recipe: Recipe) -> int:
        d = Path(recipe.out)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "recipe.yaml"
        atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        with open(d / "output.log", "a") as f:
            f.write(f"=== prunekit sweep: {_now()}: python -m prunekit run {path} --resume\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen([sys.executable, "-m", "prunekit", "run", str(path), "--resume"], stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    preexec_fn=_die_with_parent(os.getpid()))
        self.procs[proc] = (job, d / "output.log", offset, time.perf_counter())
        return proc.pid

    def wait(self) -> list[tuple[Any, int, str | None, float]]:
        """Block until at least one child exits; ``(job, returncode, error or None, seconds)`` for each one."""
        while not (done := [p for p in self.procs if p.poll() is not None]):
            time.sleep(0.2)
        out = []
        for p in done:
            job, logf, offset, t0 = self.procs.pop(p)
            error = None if p.returncode == 0 else _error_of(logf, offset, p.returncode)
            out.append((job, p.returncode, error, time.perf_counter() - t0))
        return out

    def stop(self) -> list[Any]:
        """Terminate every child (SIGTERM, then SIGKILL after 10 s); their jobs."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        jobs = [j for j, *_ in self.procs.values()]
        self.procs.clear()
        return jobs


def _error_of(logf: Path, offset: int, rc: int) -> str:
    """The error of a failed child from its output: prunekit's one-line message, else the exception line."""
    with open(logf, errors="replace") as f:
        f.seek(offset)
        lines = [ln.rstrip() for ln in f.read()[-20000:].splitlines() if ln.strip()]
    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
    for ln in reversed(lines):
        if ln.startswith("prunekit run: error: "):
            return f"{ln[len('prunekit run: error: '):]} ({how})"
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln):
            return f"{ln} ({how})"
    return f"{lines[-1] if lines else 'no output'} ({how})"


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep at a time in a folder (the lock dies with the process, so a killed sweep never blocks a rerun)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(out / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirError(f"another sweep is running in {str(out)!r}; wait for it or choose another --out") \
                from None
        yield


# ------------------------------------------------------------------------------------------------ results
_METRICS = ("top1", "top5", "macs", "params", "latency_ms")
_CUTS = (("macs", "macs_reduction"), ("params", "params_reduction"), ("latency_ms", "latency_reduction"))


def _scan_points(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for f in sorted((out / "points").glob("*/point.json")):
        info = _read_json(f)
        if info and "settings" in info and "index" in info:
            found.append((f.parent, info))
    return found


def point_row(out: Path, d: Path, info: dict[str, Any]) -> dict[str, Any]:
    """One results row: settings, the final stage's metrics, the baseline's, the top-1 drop and the cuts."""
    row: dict[str, Any] = {"index": info["index"], "point": info["point"], "status": info.get("status", "pending"),
                           "settings": info["settings"]}
    final = _read_json(d / info["final_dir"] / runs.METRICS) or {} if row["status"] == "ok" else {}
    base = _read_json(Path(info["baseline_dir"]) / runs.METRICS) or {} if info.get("baseline_dir") else {}
    row.update({k: final[k] for k in _METRICS if final.get(k) is not None})
    row.update({f"baseline_{k}": base[k] for k in _METRICS if base.get(k) is not None})
    if "top1" in row and "baseline_top1" in row:
        row["top1_drop"] = row["baseline_top1"] - row["top1"]
    for k, name in _CUTS:
        if k in row and row.get(f"baseline_{k}"):
            row[name] = 1 - row[k] / row[f"baseline_{k}"]
    row.update(trials=info.get("trials"), runs=info.get("runs", 0), seconds=info.get("seconds"),
               error=info.get("error"), dir=str(d.relative_to(out)) if d.is_relative_to(out) else str(d))
    return {k: v for k, v in row.items() if v is not None}


def constraint_values(row: dict[str, Any], targets: Mapping[str, float]) -> list[float]:
    """Optuna constraints of a row (<= 0 means the target is met; a missing metric misses it)."""
    out = []
    for name, goal in targets.items():
        col, sense = TARGETS[name]
        v = row.get(col)
        out.append(1.0 if v is None else (goal - v if sense == ">=" else v - goal))
    return out


def meets(row: dict[str, Any], targets: Mapping[str, float]) -> bool:
    return row["status"] == "ok" and meets_targets(row, targets)


def collect_results(out: str | Path, targets: Mapping[str, float] | None = None) -> SweepResult:
    """Read every point of the sweep folder ``out``: rows, the top-1 vs MACs Pareto front, the best point.

    Example:
        >>> res = collect_results("runs/sweep")
        >>> [p["point"] for p in res.points if p.get("pareto")]
    """
    out = Path(out).resolve()
    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    rows = [point_row(out, d, info) for d, info in _scan_points(out)]
    rows.sort(key=lambda r: r["index"])
    fronts = {}
    for cost in ("macs", "latency_ms"):
        cand = [r for r in rows if r["status"] == "ok" and cost in r and "top1" in r]
        fronts[cost] = [cand[i]["point"] for i in pareto_front([(r[cost], r["top1"]) for r in cand])]
    ok = [r for r in rows if meets(r, targets)]
    best = max(ok, key=lambda r: (r["top1"], -r.get("macs", math.inf)), default=None)
    for r in rows:
        r["pareto"] = r["point"] in fronts["macs"]
        if fronts["latency_ms"]:
            r["pareto_latency"] = r["point"] in fronts["latency_ms"]
        r["meets_targets"] = meets(r, targets)
    return SweepResult(out, rows, fronts["macs"], best, dict(targets))


def write_results(out: str | Path, targets: Mapping[str, float] | None = None, plot: bool = True) -> SweepResult:
    """Write ``results.json``, ``results.csv`` (and ``pareto.png``) of the sweep folder ``out``."""
    res = collect_results(out, targets)
    lat = [r["point"] for r in res.points if r.get("pareto_latency")]
    atomic_write_json(res.out / "results.json", {
        "targets": res.targets, "best": res.best["point"] if res.best else None, "pareto_front": res.front,
        **({"pareto_front_latency": lat} if lat else {}), "points": res.points})
    keys = list(dict.fromkeys(k for r in res.points for k in r["settings"]))
    cols = ["index", "point", "status", *keys]
    cols += [c for c in ("top1", "top5", "macs", "params", "latency_ms", "baseline_top1", "baseline_macs",
                         "baseline_params", "baseline_latency_ms", "top1_drop", "macs_reduction", "params_reduction",
                         "latency_reduction", "pareto", "pareto_latency", "meets_targets", "trials", "runs",
                         "seconds", "error", "dir") if any(c in r for r in res.points)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res.points:
        flat = {**r, **r["settings"], "trials": " ".join(map(str, r.get("trials", [])))}
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
    atomic_write_text(res.out / "results.csv", buf.getvalue())
    if plot and any(r["status"] == "ok" and "macs" in r for r in res.points):
        _plot(res, res.out / "pareto.png")
    return res


def _plot(res: SweepResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("sweep: matplotlib is missing, so %s was not drawn (pip install 'prunekit[plots]')", path)
        return
    ok = [r for r in res.points if r["status"] == "ok" and "top1" in r]
    costs = [c for c in ("macs", "latency_ms") if any(c in r for r in ok)]
    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        scale, unit = (1e6, "MACs (M)") if cost == "macs" else (1.0, "latency (ms)")
        pts = [r for r in ok if cost in r]
        front = [r for r in pts if r.get("pareto" if cost == "macs" else "pareto_latency")]
        front.sort(key=lambda r: r[cost])
        ax.scatter([r[cost] / scale for r in pts], [r["top1"] for r in pts], c="0.6", s=18, label="points")
        ax.step([r[cost] / scale for r in front], [r["top1"] for r in front], where="post", c="C0", marker="o",
                label="Pareto front")
        for r in pts:
            ax.annotate(str(r["index"]), (r[cost] / scale, r["top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        bases = {(r[f"baseline_{cost}"], r["baseline_top1"]) for r in pts if f"baseline_{cost}" in r
                 and "baseline_top1" in r}
        if bases:
            ax.scatter([b[0] / scale for b in bases], [b[1] for b in bases], marker="*", s=150, c="C3",
                       label="baseline")
        if res.best and cost in res.best:
            ax.scatter([res.best[cost] / scale], [res.best["top1"]], s=160, facecolors="none", edgecolors="C2",
                       linewidths=2, label=f"best meeting targets ({res.best['index']})")
        ax.set_xlabel(unit)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep {res.out.name}: {len(ok)} points; targets: {describe_targets(res.targets)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry point
def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


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
    if search == "grid" and trials is not None:
        raise ConfigError("--trials is only for --search optuna; a grid runs every combination")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be at least 1")
    objectives = check_objectives(objectives)
    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    space = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
    if not space:
        raise ConfigError("--grid: give at least one KEY=V1,V2,... (e.g. stages.prune.ratio=0.3,0.5)")
    if search == "optuna":
        _optuna()
    sweep = _Sweep(recipe, space, Path(out), search, overrides)  # every point validated here, before any run
    state = json.loads(json.dumps({
        "recipe": str(sweep.path), "base": {k: v for k, v in sweep.base.to_dict().items() if k != "out"},
        "space": {k: [str(v) if isinstance(v, Range) else v for v in vs] for k, vs in sweep.space.items()},
        "search": search, "trials": trials, "objectives": objectives, "targets": targets}, default=str))
    prev = _read_json(sweep.out / "sweep.json")
    if prev is None and sweep.out.is_dir() and any(sweep.out.iterdir()):
        raise RunDirError(f"--out {str(out)!r} holds files but no sweep.json; choose another --out")
    if prev is not None and prev.get("base") != state["base"]:
        keys = _diff(prev.get("base"), state["base"])
        raise ConfigError(f"--out {str(out)!r} holds a sweep of a different recipe (differs at: "
                          f"{', '.join(keys[:5])}); choose another --out, or restore the recipe to resume")
    if jobs > (os.cpu_count() or 1):
        log.warning("sweep: --jobs %d is more than the %d CPU cores", jobs, os.cpu_count() or 1)
    sweep.out.mkdir(parents=True, exist_ok=True)
    with _lock(sweep.out):
        atomic_write_json(sweep.out / "sweep.json", state)

        def on_done(p: _Point) -> None:
            r = point_row(sweep.out, p.dir, p.info)
            if r["status"] == "ok":
                log.info("sweep: %s: top1 %.2f%% (drop %+.2f), MACs cut %.1f%% (%.0f s)", p.name, r.get("top1", 0),
                         r.get("top1_drop", math.nan), 100 * r.get("macs_reduction", math.nan), r.get("seconds", 0))
            else:
                log.error("sweep: %s FAILED: %s", p.name, r.get("error"))
            write_results(sweep.out, targets, plot=False)

        runner = _Runner(jobs)
        if search == "grid":
            sweep.run_grid(runner, retry_failed, on_done)
        else:
            sweep.run_search(runner, trials or 0, objectives, targets, retry_failed, on_done)
        return write_results(sweep.out, targets)
