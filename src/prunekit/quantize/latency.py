"""Latency of model files side by side (float and int8, ONNX Runtime and OpenVINO, eager for reference), timed
*alternately* in one run as ``prunekit.measure.latency.compare_latency`` times modules: ``rounds`` rounds, each
giving every variant ``runs / rounds`` timed calls after one untimed re-warm call, the order reversed every other
round, so a machine whose speed drifts slows every variant alike. Statistics are ``measure``'s ``LatencyStats``
(median, p90, spread, per-round medians).

Example:
    >>> fns = {"dense fp32": file_call("dense.onnx", x, 2), "dense int8": file_call("dense_int8.onnx", x, 2)}
    >>> stats = paired_times(fns, batch_size=1, runs=50)
    >>> stats["dense fp32"].median_ms / stats["dense int8"].median_ms   # int8 speed-up
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import ConfigError
from prunekit.measure.latency import Clock, LatencyStats, summarize
from prunekit.quantize.graph import to_feeds
from prunekit.quantize.runner import load_runner


def file_call(path: str | Path, example_inputs: Any, threads: int | None = None) -> Callable[[], Any]:
    """``fn()`` running the model file (``.onnx`` on ONNX Runtime, ``.xml`` on OpenVINO) on fixed inputs; the
    feeds are made once, outside the timed call."""
    runner = load_runner(path, threads)
    feeds = to_feeds(example_inputs, list(runner.input_names), "example_inputs")
    return lambda: runner(feeds)


def eager_call(model: torch.nn.Module, example_inputs: torch.Tensor) -> Callable[[], Any]:
    """``fn()`` running a torch module eagerly under ``inference_mode`` (threads: ``torch.set_num_threads``)."""
    model = model.eval()

    def fn() -> Any:
        with torch.inference_mode():
            return model(example_inputs)

    return fn


def _split(runs: int, rounds: int) -> list[int]:
    base, extra = divmod(runs, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def paired_times(fns: Mapping[str, Callable[[], Any]], batch_size: int, runs: int = 50, warmup: int = 5,
                 rounds: int = 10, threads: int = 0, backend: str = "", clock: Clock = time.perf_counter
                 ) -> dict[str, LatencyStats]:
    """Time every ``fn`` alternately (A B C C B A ...); returns ``{name: LatencyStats}``.

    Args:
        fns: name -> a call that runs one batch and returns when it is done.
        batch_size: the batch of each call (for the throughput).
        runs: timed calls per variant; warmup: untimed calls per variant first.
        rounds: rounds of alternation; threads, backend: recorded in the statistics.
        clock: the timer in seconds (injectable for tests).
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(f"runs {runs}, warmup {warmup}, rounds {rounds}: need runs >= 1, warmup >= 0, rounds >= 1")
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r, k in enumerate(_split(runs, min(rounds, runs))):
        for n in names if r % 2 == 0 else names[::-1]:
            fns[n]()  # re-warm caches after the other variants ran
            ts = []
            for _ in range(k):
                t0 = clock()
                fns[n]()
                ts.append(clock() - t0)
            times[n] += ts
            per_round[n].append(statistics.median(ts))
    return {n: summarize(times[n], batch_size, backend, threads, warmup, per_round[n]) for n in names}


def round_spread(stats: LatencyStats) -> tuple[float, float]:
    """(lowest, highest) of the per-round medians in ms: the spread across repeats."""
    r = stats.round_medians_ms or [stats.median_ms]
    return min(r), max(r)


# ----------------------------------------------------------------------------------------------- side by side
@dataclass(frozen=True)
class Variant:
    """One model to time: ``model`` (dense / pruned), ``runtime`` (eager / onnxruntime / openvino), ``precision``
    (float32 / int8) and what runs it: a model file (``.onnx`` / ``.xml``) or a torch module (eager)."""

    model: str
    runtime: str
    precision: str
    source: str | Path | torch.nn.Module

    @property
    def name(self) -> str:
        return f"{self.model} {self.precision} ({self.runtime})"


def side_by_side(variants: list[Variant], make_inputs: Callable[[int], Any], batch_sizes: tuple[int, ...] = (1, 8),
                 runs: int = 30, warmup: int = 3, rounds: int = 10, threads: int = 2) -> list[dict[str, Any]]:
    """Time every variant alternately (``paired_times``) at each batch size; one row per (variant, batch).

    A row holds the variant's ``model`` / ``runtime`` / ``precision``, ``batch``, ``median_ms``, ``p90_ms``, the
    spread across rounds (``round_min_ms``, ``round_max_ms``) and ``speedup`` against the dense float32 model on the
    same runtime (``None`` when that one is not timed). Eager variants run with ``threads`` torch threads.
    """
    if not variants:
        raise ConfigError("side_by_side: no model to time")
    rows = []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in batch_sizes:
            x = make_inputs(b)
            fns = {v.name: eager_call(v.source, x) if isinstance(v.source, torch.nn.Module)
                   else file_call(v.source, x, threads) for v in variants}
            stats = paired_times(fns, batch_size=b, runs=runs, warmup=warmup, rounds=min(rounds, runs),
                                 threads=threads, backend="side-by-side")
            rows += [_row(v, b, stats[v.name]) for v in variants]
    finally:
        torch.set_num_threads(old_threads)
    for r in rows:
        ref = next((o for o in rows if o["batch"] == r["batch"] and o["runtime"] == r["runtime"]
                    and o["model"] == "dense" and o["precision"] == "float32"), None)
        r["speedup"] = ref["median_ms"] / r["median_ms"] if ref else None
    return rows


def _row(v: Variant, batch: int, s: LatencyStats) -> dict[str, Any]:
    lo, hi = round_spread(s)
    return {"model": v.model, "runtime": v.runtime, "precision": v.precision, "batch": batch,
            "median_ms": s.median_ms, "p90_ms": s.p90_ms, "round_min_ms": lo, "round_max_ms": hi, "runs": s.runs,
            "file": None if isinstance(v.source, torch.nn.Module) else str(v.source)}


def format_side_by_side(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table: one line per variant, one column per batch (median, rounds' spread, speed-up)."""
    batches = sorted({r["batch"] for r in rows})
    keys = list(dict.fromkeys((r["model"], r["precision"], r["runtime"]) for r in rows))
    by = {(r["model"], r["precision"], r["runtime"], r["batch"]): r for r in rows}
    head = f"{'model':<8}{'precision':<11}{'runtime':<13}" + "".join(
        f"{f'batch {b}: ms (rounds) x':>34}" for b in batches)
    lines = [head]
    for k in keys:
        cells = []
        for b in batches:
            r = by.get((*k, b))
            sp = f"{r['speedup']:.2f}x" if r and r["speedup"] else "-"
            cells.append(f"{r['median_ms']:.3f} ({r['round_min_ms']:.3f}-{r['round_max_ms']:.3f}) {sp}" if r
                         else "-")
        lines.append(f"{k[0]:<8}{k[1]:<11}{k[2]:<13}" + "".join(f"{c:>34}" for c in cells))
    lines.append("x: speed-up against the dense float32 model on the same runtime (paired timing, median of all "
                 "runs; (lo-hi): the lowest and highest median of the rounds)")
    return "\n".join(lines)
