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
