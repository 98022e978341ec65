"""Latency: warm-up, N timed runs, median / p90 / p99 / std / throughput, on several backends.

Backends (``BACKENDS``): ``eager`` (torch, CPU), ``onnxruntime`` (ONNX Runtime, CPU), ``compile`` (``torch.compile``,
CPU; needs a C++ compiler) and ``cuda`` (torch eager on the GPU, timed with CUDA events).

Two models are compared by timing them *alternately* in one run (:func:`compare_latency`): ``rounds`` rounds, each
giving every model ``runs / rounds`` timed runs after one untimed re-warm call, the order reversed every other round
(A B B A ...). A machine whose speed drifts (other jobs, frequency scaling) then slows both models alike; timing them
in separate runs does not (on a noisy 2-core machine that gave latency ratios from 0.55 to 1.09 for the same pair).

Example:
    >>> s = measure_latency(model, torch.randn(1, 3, 224, 224), backend="onnxruntime", threads=2)
    >>> s.median_ms, s.p90_ms, s.throughput
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.batch import to_device
from prunekit.errors import ConfigError
from prunekit.measure.macs import batch_size_of, call_model
from prunekit.registry import Registry

log = logging.getLogger(__name__)
Clock = Callable[[], float]


class BackendUnavailable(ConfigError):
    """The backend cannot run here (no CUDA, no onnxruntime, torch.compile failed); the message says why."""


# ----------------------------------------------------------------------------------------------- statistics
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default) of already sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class LatencyStats:
    """Latency of one model on one backend, in milliseconds per call (one call = one batch)."""

    backend: str
    batch_size: int
    threads: int
    runs: int
    warmup: int
    median_ms: float
    mean_ms: float
    std_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples per second at the median latency
    round_medians_ms: list[float] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)

    def to_dict(self, with_times: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_times:
            d.pop("times_ms")
        return d

    def summary(self) -> str:
        return (f"{self.backend}: median {self.median_ms:.3f} ms  p90 {self.p90_ms:.3f}  p99 {self.p99_ms:.3f}  "
                f"std {self.std_ms:.3f}  {self.throughput:.1f} samples/s  (batch {self.batch_size}, "
                f"{self.threads} threads, {self.runs} runs)")


def summarize(times_s: Sequence[float], batch_size: int, backend: str = "", threads: int = 0, warmup: int = 0,
              round_medians_s: Sequence[float] = ()) -> LatencyStats:
    """Statistics of per-call times in seconds (std is the sample standard deviation)."""
    if not times_s:
        raise ConfigError("--runs must be at least 1: there is nothing to summarise")
    ms = sorted(t * 1e3 for t in times_s)
    median = statistics.median(ms)
    return LatencyStats(
        backend=backend, batch_size=int(batch_size), threads=int(threads), runs=len(ms), warmup=int(warmup),
        median_ms=median, mean_ms=statistics.fmean(ms), std_ms=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        p90_ms=percentile(ms, 90), p99_ms=percentile(ms, 99), min_ms=ms[0], max_ms=ms[-1],
        throughput=batch_size / (median / 1e3) if median > 0 else math.inf,
        round_medians_ms=[t * 1e3 for t in round_medians_s], times_ms=[t * 1e3 for t in times_s])


# ----------------------------------------------------------------------------------------------- backends
class Backend:
    """How to run a model on one runtime. ``prepare`` returns ``fn()`` doing one forward pass that has finished
    when it returns; ``timer`` turns it into ``timed() -> seconds``."""

    name = "?"
    device = "cpu"

    def check(self) -> None:
        """Raise ``BackendUnavailable`` when this backend cannot run on this machine."""

    def prepare(self, model: nn.Module, inputs: Any, threads: int) -> Callable[[], Any]:
        raise NotImplementedError

    def timer(self, fn: Callable[[], Any], clock: Clock) -> Callable[[], float]:
        def timed() -> float:
            t0 = clock()
            fn()
            return clock() - t0

        return timed

    def close(self) -> None:
        """Free what ``prepare`` made (temporary files, sessions)."""


BACKENDS: Registry[type[Backend]] = Registry("backend")


def _on_cpu(model: nn.Module, inputs: Any) -> tuple[nn.Module, Any]:
    """The model and inputs on the CPU (a copy when the model lives elsewhere): CPU backends time the CPU."""
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).to("cpu").eval()
    return model, to_device(inputs, "cpu")


@BACKENDS.register("eager")
class EagerBackend(Backend):
    """torch eager mode on the CPU, under ``torch.inference_mode``."""

    name = "eager"

    def prepare(self, model: nn.Module, inputs: Any, threads: int) -> Callable[[], Any]:
        model, inputs = _on_cpu(model, inputs)
        return lambda: call_model(model, inputs)


@BACKENDS.register("compile")
class CompileBackend(Backend):
    """``torch.compile`` (inductor) on the CPU; the first call (compilation) is part of the warm-up, not timed."""

    name = "compile"

    def prepare(self, model: nn.Module, inputs: Any, threads: int) -> Callable[[], Any]:
        model, inputs = _on_cpu(model, inputs)
        compiled = torch.compile(model)
        try:
            with torch.inference_mode():
                call_model(compiled, inputs)
        except Exception as e:
            line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise BackendUnavailable(f"--backend compile: torch.compile failed on this model/machine "
                                     f"({type(e).__name__}: {line}); use eager or onnxruntime") from e
        return lambda: call_model(compiled, inputs)


@BACKENDS.register("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU (all graph optimisations, ``threads`` intra-op threads, sequential execution).

    The model is exported with :func:`prunekit.export.onnx.export_onnx` into a temporary folder first.
    """

    name = "onnxruntime"

    def check(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("--backend onnxruntime: onnxruntime is not installed; "
                                     "pip install 'prunekit[export]'") from None

    def prepare(self, model: nn.Module, inputs: Any, threads: int) -> Callable[[], Any]:
        from prunekit.export.core import ExportOptions, as_tensors, output_names, positional
        from prunekit.export.onnx import OnnxRunner, export_onnx

        model, inputs = _on_cpu(model, inputs)
        self._tmp = tempfile.TemporaryDirectory(prefix="prunekit-ort-")
        path = f"{self._tmp.name}/model.onnx"
        module, names, args, prefix = positional(model, inputs)
        with torch.no_grad():
            outs = output_names(len(as_tensors(module(*args))))
        export_onnx(module, args, names, outs, path, ExportOptions(dynamic_batch=False), prefix)
        runner = OnnxRunner(path, threads)
        session, feeds = runner.session, runner.feeds(*args)  # numpy inputs made once, outside the timed call
        return lambda: session.run(None, feeds)

    def close(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()


@BACKENDS.register("cuda")
class CudaBackend(Backend):
    """torch eager on the GPU (a copy of the model), timed with CUDA events between ``record`` calls on the
    current stream; cuDNN autotuning is on while timing (and restored after)."""

    name = "cuda"
    device = "cuda"

    def check(self) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("--backend cuda: CUDA is not available on this machine (torch "
                                     f"{torch.__version__}, torch.cuda.is_available() is False); valid here: "
                                     f"{', '.join(n for n in BACKENDS.names() if n != 'cuda')}")

    def prepare(self, model: nn.Module, inputs: Any, threads: int) -> Callable[[], Any]:
        gpu_model = copy.deepcopy(model).to("cuda").eval()
        gpu_inputs = to_device(inputs, "cuda")
        self._benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

        def fn() -> Any:
            out = call_model(gpu_model, gpu_inputs)
            torch.cuda.synchronize()
            return out

        self._run = lambda: call_model(gpu_model, gpu_inputs)
        return fn

    def timer(self, fn: Callable[[], Any], clock: Clock) -> Callable[[], float]:
        # CUDA events time the GPU work between two points of the stream; the host clock would time the launch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        run = self._run

        def timed() -> float:
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed

    def close(self) -> None:
        if hasattr(self, "_benchmark"):
            torch.backends.cudnn.benchmark = self._benchmark
        torch.cuda.empty_cache()


def get_backend(name: str) -> Backend:
    """A fresh backend by name; raises ``ConfigError`` for an unknown name, ``BackendUnavailable`` when it cannot
    run here (``cuda`` without CUDA)."""
    backend = BACKENDS.get(name)()
    backend.check()
    return backend


def check_backends(names: Sequence[str]) -> None:
    """Fail early, before any timing, when a backend is unknown or cannot run here."""
    for n in names:
        get_backend(n)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the block (None: leave as is); yields the number in use."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------- timing
def _split(runs: int, rounds: int) -> list[int]:
    base, extra = divmod(runs, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def compare_latency(models: Mapping[str, nn.Module], example_inputs: Any, backend: str = "eager", runs: int = 50,
                    warmup: int = 10, threads: int | None = None, rounds: int = 10,
                    clock: Clock = time.perf_counter, rewarm: bool = True) -> dict[str, LatencyStats]:
    """Time several models on the same inputs *alternately* in one run; returns ``{name: LatencyStats}``.

    Args:
        models: name -> model (e.g. ``{"baseline": dense, "pruned": pruned}``).
        example_inputs: a tensor, tuple or dict of tensors; its batch size is the measured batch size.
        backend: ``eager``, ``onnxruntime``, ``compile`` or ``cuda``.
        runs: timed runs per model; warmup: untimed runs per model before the first round.
        threads: intra-op threads (torch and ONNX Runtime); None keeps torch's current setting.
        rounds: rounds of alternation; each round every model gets ``runs / rounds`` timed runs.
        clock: the timer (seconds), injectable for tests; CUDA uses events instead.
        rewarm: one untimed call before each model's share of a round (caches hold the other model's data);
            leave it out only for calls long enough (seconds) that caches do not matter.

    Example:
        >>> stats = compare_latency({"dense": dense, "pruned": pruned}, torch.randn(1, 3, 224, 224), "onnxruntime")
        >>> 1 - stats["pruned"].median_ms / stats["dense"].median_ms   # latency reduction
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ConfigError(f"--runs {runs}, --warmup {warmup}, --rounds {rounds}: need runs >= 1, warmup >= 0, "
                          "rounds >= 1")
    rounds = min(rounds, runs)
    batch = batch_size_of(example_inputs)
    names = list(models)
    backends = {n: get_backend(backend) for n in names}
    modes = {n: m.training for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    try:
        with torch_threads(threads) as n_threads, torch.inference_mode():
            timed = {}
            for n in names:
                models[n].eval()
                fn = backends[n].prepare(models[n], example_inputs, n_threads)
                for _ in range(warmup):
                    fn()
                timed[n] = (fn, backends[n].timer(fn, clock))
            for r, k in enumerate(_split(runs, rounds)):
                order = names if r % 2 == 0 else names[::-1]
                for n in order:
                    fn, t = timed[n]
                    if rewarm:
                        fn()  # re-warm caches after the other model ran
                    ts = [t() for _ in range(k)]
                    times[n].extend(ts)
                    per_round[n].append(statistics.median(ts))
    finally:
        for n in names:
            backends[n].close()
            models[n].train(modes[n])
    return {n: summarize(times[n], batch, backend, n_threads, warmup, per_round[n]) for n in names}


def measure_latency(model: nn.Module, example_inputs: Any, backend: str = "eager", runs: int = 50, warmup: int = 10,
                    threads: int | None = None, clock: Clock = time.perf_counter) -> LatencyStats:
    """Latency of one model: ``warmup`` untimed runs then ``runs`` timed runs.

    Example:
        >>> measure_latency(model, torch.randn(32, 3, 32, 32), "eager", threads=2).median_ms
    """
    return compare_latency({"model": model}, example_inputs, backend, runs, warmup, threads, 1, clock)["model"]
