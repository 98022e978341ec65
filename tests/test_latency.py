"""Latency: statistics against known values, timing with an injected fake clock (exact figures, alternation order),
the CUDA-event path with fake events, backend errors, thread/mode restoration, hardware-aware rounding."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.measure import hardware
from prunekit.measure.latency import (
    BackendUnavailable,
    CudaBackend,
    compare_latency,
    measure_latency,
    percentile,
    summarize,
)
from prunekit.measure.profile import LatencyArgs, format_latency, latency_metrics


class Tagged(nn.Module):
    """Appends its tag to ``log`` on every call; the fake clock charges ``cost`` seconds for it."""

    def __init__(self, tag: str, log: list[str], cost: float):
        super().__init__()
        self.tag, self.log, self.cost = tag, log, cost
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        self.log.append(self.tag)
        return self.lin(x)


class FakeClock:
    """A clock that advances only when read at the end of a timed call, by the cost of the model that ran last."""

    def __init__(self, log: list[str], costs: dict[str, float]):
        self.log, self.costs, self.now, self.reads = log, costs, 100.0, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # end of a timed call
            self.now += self.costs[self.log[-1]]
        return self.now


def test_summarize_known_values():
    times = [i / 1000 for i in range(1, 11)]  # 1..10 ms
    s = summarize(times, batch_size=4, backend="eager", threads=2, warmup=3)
    assert s.runs == 10 and s.batch_size == 4 and s.threads == 2 and s.warmup == 3
    for got, want in ((s.median_ms, 5.5), (s.mean_ms, 5.5), (s.min_ms, 1.0), (s.max_ms, 10.0), (s.p90_ms, 9.1),
                      (s.p99_ms, 9.91), (s.std_ms, statistics.stdev(range(1, 11))), (s.throughput, 4 / 5.5e-3)):
        assert got == pytest.approx(want, rel=1e-12)
    assert s.times_ms == pytest.approx([float(i) for i in range(1, 11)])
    assert summarize([0.002], 1).std_ms == 0.0
    with pytest.raises(ConfigError, match="--runs"):
        summarize([], 1)


def test_percentile_matches_numpy():
    g = torch.Generator().manual_seed(0)
    v = sorted(torch.rand(37, generator=g).tolist())
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)), rel=1e-12, abs=1e-15)
    assert math.isnan(percentile([], 50))


def test_measure_latency_with_fake_clock_gives_exact_stats():
    log: list[str] = []
    durations = iter([0.003, 0.001, 0.002, 0.010, 0.004])
    model = Tagged("m", log, 0.0)

    class Scripted(FakeClock):
        def __call__(self):
            self.reads += 1
            if self.reads % 2 == 0:
                self.now += next(durations)
            return self.now

    s = measure_latency(model, torch.randn(3, 4), "eager", runs=5, warmup=2, clock=Scripted(log, {}))
    want = summarize([0.003, 0.001, 0.002, 0.010, 0.004], 3, "eager", torch.get_num_threads(), 2)
    assert s.median_ms == pytest.approx(3.0) and s.p90_ms == pytest.approx(want.p90_ms)
    assert s.std_ms == pytest.approx(want.std_ms) and s.throughput == pytest.approx(1000.0)
    # 2 warm-up calls + 1 re-warm call + 5 timed calls
    assert len(log) == 8 and s.runs == 5


def test_compare_latency_alternates_and_attributes_time():
    log: list[str] = []
    a, b = Tagged("a", log, 0.0), Tagged("b", log, 0.0)
    clock = FakeClock(log, {"a": 0.002, "b": 0.001})
    st = compare_latency({"a": a, "b": b}, torch.randn(1, 4), "eager", runs=4, warmup=1, rounds=2, clock=clock)
    # warm-up each, then round 0: a(rewarm) a a, b(rewarm) b b; round 1 reversed: b b b, a a a
    assert log == ["a", "b", "a", "a", "a", "b", "b", "b", "b", "b", "b", "a", "a", "a"]
    assert st["a"].median_ms == pytest.approx(2.0) and st["b"].median_ms == pytest.approx(1.0)
    assert st["a"].round_medians_ms == pytest.approx([2.0, 2.0]) and st["a"].runs == st["b"].runs == 4


def test_threads_and_training_mode_are_restored():
    before = torch.get_num_threads()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).train()
    s = measure_latency(model, torch.randn(2, 8), "eager", runs=3, warmup=1, threads=1)
    assert s.threads == 1 and s.runs == 3 and s.median_ms > 0
    assert torch.get_num_threads() == before and model.training


def test_onnxruntime_backend_runs():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    s = measure_latency(model, torch.randn(2, 1, 8, 8), "onnxruntime", runs=5, warmup=1, threads=1)
    assert s.backend == "onnxruntime" and s.runs == 5 and s.batch_size == 2 and 0 < s.median_ms < 1000


def test_compile_backend_plumbing_and_failure(monkeypatch):
    model = nn.Linear(4, 2)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # real inductor compiles take ~30 s on 2 cores
    assert measure_latency(model, torch.randn(1, 4), "compile", runs=2, warmup=1).backend == "compile"

    def broken(m, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BackendUnavailable, match="--backend compile: torch.compile failed.*no C\\+\\+ compiler"):
        measure_latency(model, torch.randn(1, 4), "compile", runs=2)


def test_cuda_event_timing_path_with_fake_events(monkeypatch):
    """The event arithmetic of the CUDA backend, without a GPU: elapsed_time is in ms, the result in seconds."""
    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            calls.append("record")
            self.t = len(calls)

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, end):
            return 2.5 * (end.t - self.t)  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("device-sync"))
    backend = CudaBackend()
    backend._run = lambda: calls.append("run")
    timed = backend.timer(lambda: None, clock=lambda: 0.0)
    assert timed() == pytest.approx(2.5 * 2 / 1e3)  # record, run, record -> 2 steps of 2.5 ms
    assert calls == ["device-sync", "record", "run", "record", "sync"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="--backend cuda: CUDA is not available.*valid here: .*eager"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), "cuda")


def test_bad_backend_and_counts():
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'.*eager.*onnxruntime"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), "tensorrt")
    with pytest.raises(ConfigError, match="--runs 0"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), "eager", runs=0)
    with pytest.raises(ConfigError, match="backend"):
        LatencyArgs.build({"backend": ["eager", "onnxrt"]})


def test_latency_metrics_for_eval():
    m = latency_metrics(nn.Linear(8, 4), torch.randn(1, 8), ["eager"], runs=4, warmup=1, threads=1)
    assert set(m) == {"eager"} and m["eager"]["runs"] == 4 and "times_ms" not in m["eager"]
    assert {"median_ms", "p90_ms", "p99_ms", "std_ms", "throughput"} <= set(m["eager"])
    text = format_latency(m)
    assert text.startswith("eager") and "median" in text and "samples/s" in text


@pytest.mark.parametrize("flags, backend, dtype, want", [
    ({"avx2", "fma"}, "onnxruntime", "float32", 8),
    ({"avx512f", "avx2"}, "onnxruntime", "float32", 16),
    ({"avx512f", "avx2"}, "eager", "float32", 16),
    ({"avx2"}, "eager", "bfloat16", 16),
    ({"avx2"}, "cuda", "float16", 8),
    ({"avx2"}, "cuda", "int8", 16),
    (set(), "compile", "float32", 8),
])
def test_recommended_round_to(monkeypatch, flags, backend, dtype, want):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.recommended_round_to(backend, dtype) == want


def test_recommended_round_to_errors():
    with pytest.raises(ConfigError, match="unknown backend 'tpu'.*onnxruntime"):
        hardware.recommended_round_to("tpu")
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        hardware.recommended_round_to("onnxruntime", "float64")
