"""Optuna TPE search over a sweep's space: each trial's settings are a point (a repeated suggestion waits for the
point already queued), its metrics the objectives, the targets the sampler's constraints; the study is kept in
``study.db`` so that a killed search resumes (trials left running are asked again)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from prunekit._io import atomic_write_json
from prunekit.errors import ConfigError
from prunekit.pipeline.sweep.points import Point, Sweep
from prunekit.pipeline.sweep.runner import Runner, execute
from prunekit.pipeline.sweep.space import OBJECTIVES, import_optuna, suggest
from prunekit.report.sweep import point_row
from prunekit.report.targets import TARGETS

log = logging.getLogger(__name__)


def constraint_values(row: dict[str, Any], targets: Mapping[str, float]) -> list[float]:
    """Optuna constraints of a row (<= 0 means the target is met; a missing metric misses it)."""
    out = []
    for name, goal in targets.items():
        col, sense = TARGETS[name]
        v = row.get(col)
        out.append(1.0 if v is None else (goal - v if sense == ">=" else v - goal))
    return out


class _Search:
    """One search: ``pull`` asks the study for the next point to run, ``done`` tells it a finished point's metrics."""

    def __init__(self, sweep: Sweep, jobs: int, objectives: list[str], targets: dict[str, float],
                 retry_failed: bool, on_done: Callable[[Point], None]):
        self.sweep, self.objectives, self.targets = sweep, objectives, targets
        self.retry_failed, self.on_done = retry_failed, on_done
        optuna = import_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.state = optuna.trial.TrialState
        self.per_trial = hasattr(optuna.trial.Trial, "set_constraint")  # Optuna >= 5; older take constraints_func
        self.constraints: dict[int, list[float]] = {}
        self.asked: dict[int, Any] = {}
        self.budget = 0  # trials still to ask (set by run_search)
        sampler = optuna.samplers.TPESampler(seed=sweep.base.seed, constant_liar=jobs > 1, constraints_func=(
            lambda t: self.constraints[t.number]) if targets and not self.per_trial else None)
        self.directions = [OBJECTIVES[o][1] for o in objectives]
        self.study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{sweep.out / 'study.db'}",
                                         load_if_exists=True, directions=self.directions, sampler=sampler)
        if [d.name.lower() for d in self.study.directions] != self.directions:
            raise ConfigError(f"--objectives {','.join(objectives)}: the study in {sweep.out / 'study.db'} has "
                              f"{len(self.study.directions)} objective(s) of other directions; choose another --out")

    def requeue(self, trials: int) -> int:
        """Close the trials a killed sweep left RUNNING and ask their settings again (the point resumes); the number
        of trials still to run."""
        study, state = self.study, self.state
        requeued = list(study.user_attrs.get("requeued", []))
        for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
            study.enqueue_trial(t.params, skip_if_exists=False)
            study.tell(t.number, state=state.FAIL, skip_if_finished=True)
            requeued.append(t.number)
        study.set_user_attr("requeued", requeued)
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        return trials - (len(finished) - len(requeued))

    def tell(self, p: Point) -> None:
        """Report ``p``'s objectives (and constraints) to every trial waiting for it; a failed point fails them."""
        row = point_row(self.sweep.out, p.dir, p.info)
        values = [row.get(OBJECTIVES[o][0]) for o in self.objectives]
        for n in p.trials:
            if row["status"] != "ok" or any(v is None for v in values):
                if row["status"] == "ok":
                    log.error("sweep: trial %d FAILED: %s has no %s", n, p.name, ", ".join(
                        OBJECTIVES[o][0] for o, v in zip(self.objectives, values) if v is None))
                self.study.tell(n, state=self.state.FAIL, skip_if_finished=True)
                continue
            cons = constraint_values(row, self.targets)
            if self.per_trial:
                for name, c in zip(self.targets, cons):
                    self.asked[n].set_constraint(name, c)
            self.constraints[n] = cons
            self.study.tell(n, values, skip_if_finished=True)
        p.trials.clear()
        self.on_done(p)

    def pull(self) -> Point | None:
        """The next point to run, asking new trials while the budget lasts; None when the budget is spent."""
        while self.budget > 0:
            self.budget -= 1
            trial = self.study.ask()
            self.asked[trial.number] = trial
            settings = {k: suggest(trial, k, v) for k, v in self.sweep.space.items()}
            try:
                p = self.sweep.point(settings)
            except ConfigError as e:
                log.error("sweep: trial %d FAILED before it ran: %s", trial.number, e)
                self.study.tell(trial, state=self.state.FAIL)
                continue
            trial.set_user_attr("point", p.name)
            p.trials.append(trial.number)
            p.info["trials"] = sorted({*p.info.get("trials", []), trial.number})
            if p.dir.is_dir():
                atomic_write_json(p.dir / "point.json", p.info)
            if p.active:  # the same settings are already queued or running
                continue
            if p.done() or (not self.retry_failed and p.info.get("status") == "failed"):
                self.tell(p)
                continue
            p.active = True
            return p
        return None

    def done(self, p: Point) -> None:
        p.active = False
        self.tell(p)


def run_search(sweep: Sweep, runner: Runner, trials: int, objectives: list[str], targets: dict[str, float],
               retry_failed: bool, on_done: Callable[[Point], None]) -> None:
    """Run an Optuna search of ``trials`` trials in all over ``sweep.space`` (resuming the study in the folder)."""
    search = _Search(sweep, runner.jobs, objectives, targets, retry_failed, on_done)
    search.budget = search.requeue(trials)
    done = trials - search.budget
    log.info("sweep: Optuna TPE (%s) in %s: %d trial(s) done, %d to run, %d job(s)",
             ", ".join(f"{o}: {d}" for o, d in zip(objectives, search.directions)), sweep.out,
             done, max(search.budget, 0), runner.jobs)
    execute(runner, [], search.pull, search.done)
