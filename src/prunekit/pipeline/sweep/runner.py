"""Running a sweep's points: at most ``jobs`` child processes ``python -m prunekit run POINT/recipe.yaml --resume``
(a shared baseline first where a point needs one), each point's status in its ``point.json``, so that a rerun skips
finished points and resumes the others; one sweep at a time per folder."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from prunekit import runs
from prunekit._io import atomic_write_json, atomic_write_text
from prunekit.errors import RunDirError
from prunekit.pipeline.recipe import Recipe, is_finished
from prunekit.pipeline.sweep.points import Baseline, Point, Sweep

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


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


class Runner:
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
def sweep_lock(out: Path) -> Iterator[None]:
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




# ------------------------------------------------------------------------------------------------ scheduling
def pick(queue: list[Point], on_done: Callable[[Point], None]) -> Point | Baseline | None:
    """The next job: the first queued point whose baseline is ready, else a baseline a queued point needs."""
    for p in list(queue):
        b = p.baseline
        if b is None or b.status == "ok":
            queue.remove(p)
            return p
        if b.status == "failed":
            queue.remove(p)
            record(p, "failed", f"its baseline run {b.run_dir} failed: {b.error}")
            on_done(p)
        elif b.status == "pending":
            b.status = "running"
            return b
    return None


def record(p: Point, status: str, error: str | None = None, seconds: float | None = None,
           pid: int | None = None) -> None:
    """Set a point's status (and times, run count, child pid) and write its ``point.json``."""
    p.info.update(status=status, error=error, pid=pid)
    if status == "running":
        p.info.update(started=_now(), runs=p.info.get("runs", 0) + 1, finished=None, seconds=None)
    elif seconds is not None:
        p.info.update(finished=_now(), seconds=round(seconds, 2))
    atomic_write_json(p.dir / "point.json", p.info)


def execute(runner: Runner, queue: list[Point], pull: Callable[[], Point | None] | None,
                  on_done: Callable[[Point], None]) -> None:
    """Run ``queue`` (and what ``pull`` hands out while slots are free) with at most ``runner.jobs`` children."""
    exhausted = pull is None
    try:
        while True:
            while runner.free():
                job = pick(queue, on_done)
                if job is None and not queue and not exhausted:
                    p = pull()  # type: ignore[misc]
                    exhausted = p is None
                    queue += [p] if p is not None else []
                    continue
                if job is None:
                    break
                pid = runner.start(job, job.recipe)
                if isinstance(job, Point):
                    record(job, "running", pid=pid)
                    log.info("sweep: %s started", job.name)
                else:
                    log.info("sweep: training the shared baseline %s", job.run_dir)
            if not runner.procs:
                if queue or not exhausted:
                    continue
                return
            for job, rc, error, seconds in runner.wait():
                _finished(job, rc, error, seconds, on_done)
    except BaseException:
        for job in runner.stop():
            if isinstance(job, Point):
                record(job, "interrupted", "the sweep was interrupted; rerun it to resume this point")
        raise


def _finished(job: Point | Baseline, rc: int, error: str | None, seconds: float,
              on_done: Callable[[Point], None]) -> None:
    if isinstance(job, Baseline):
        ok = rc == 0 and is_finished(job.run_dir)
        job.status, job.error = ("ok", None) if ok else ("failed", error or "incomplete run directory")
        log.log(logging.INFO if ok else logging.ERROR, "sweep: baseline %s %s (%.0f s)", job.run_dir,
                "finished" if ok else f"FAILED: {job.error}", seconds)
        return
    ok = rc == 0 and (job.dir / job.info["final_dir"] / runs.METRICS).is_file()
    record(job, "ok" if ok else "failed", None if ok else error or "no metrics.json written", seconds)
    on_done(job)


def run_grid(sweep: Sweep, runner: Runner, retry_failed: bool, on_done: Callable[[Point], None]) -> None:
    """Run every point of the grid not done yet (and, with ``retry_failed``, those that failed before)."""
    points = [sweep.point(s) for s in sweep.grid_points()]
    todo = [p for p in points if not p.done() and (retry_failed or p.info.get("status") != "failed")]
    bases = {b.dir for p in todo if (b := p.baseline) is not None and b.status != "ok"}
    log.info("sweep: %d points (%s) in %s: %d done, %d to run, %d shared baseline(s) to train, %d job(s)",
             len(points), " x ".join(str(len(v)) for v in sweep.space.values()), sweep.out,
             len(points) - len(todo), len(todo), len(bases), runner.jobs)
    execute(runner, todo, None, on_done)

