"""Latency lookup tables (LUT): measured latency of single conv/linear layers at many channel counts, per backend.

Latency-aware pruning (``prunekit.pruning.structured.latency``) needs to know, for every prunable layer, how its
latency changes with its channel counts on the target runtime: CPU kernels work in blocks of channels (oneDNN and
ONNX Runtime's MLAS process 8 fp32 channels per AVX2 register, 16 with AVX-512), so latency is a step function of
the channel count, with steps the MACs count does not see. The table times each layer *alone* (a one-op torch module
for ``eager``, a one-op ONNX graph for ``onnxruntime``) with the real input shape of the layer in the model, at a
grid of channel counts, and keeps the figures on disk: one JSON file per environment, keyed by backend, threads,
CPU model and flags, and library versions; inside it one entry per layer signature (kind, channels, kernel,
stride, padding, dilation, groups, input shape, batch). A table is built once per model and backend and reused by
every later run (and by other models sharing layer shapes).

Each entry is the *minimum* over ``runs`` timed calls after ``warmup`` calls in ``repeats`` repeats (``spreads``:
lowest and highest repeat): on a shared machine the minimum is the estimate least moved by other jobs, which is what
a table of a layer's intrinsic cost needs; whole-model comparisons use paired medians instead
(``prunekit.measure.latency.compare_latency``). int8 backends: ``measure.latency_int8``, ``latency_ov``.

Eager inference choices (:func:`inference_copy`): the eager figures are of the model as it is run for inference:
BatchNorm folded into the preceding conv (exact in eval mode), channels_last memory format, ``threads`` torch
threads. The LUT's eager timings use the same layout (channels_last, conv with bias).

Example:
    >>> specs = collect_op_specs(model, torch.randn(1, 3, 224, 224))
    >>> table = LatencyTable("onnxruntime", threads=2)
    >>> table.measure([specs["layer1.0.conv1"].with_channels(cout=32)])
    >>> table.get(specs["layer1.0.conv1"].with_channels(cout=32))   # ms
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.batch import call_model
from prunekit.errors import ConfigError
from prunekit.measure.inference import (  # noqa: F401  (moved there; still importable from here)
    LUT_BACKENDS,
    TIMED_ONNX_OPS,
    channels_last_inputs,
    fold_batchnorm,
    inference_copy,
    onnx_node_times,
    ort_session_options,
    rest_latency_ms,
)
from prunekit.measure.inference import min_ms as _min_ms

log = logging.getLogger(__name__)
Timer = Callable[["OpSpec"], float]  # spec -> milliseconds (injectable: tests use a deterministic fake)


@dataclass(frozen=True)
class OpSpec:
    """One conv/linear layer as it runs in the model: everything its latency depends on."""

    kind: str  # "conv1d", "conv2d" or "linear"
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    in_shape: tuple[int, ...] = ()  # input shape without the channel dim: (N, H, W) for conv2d, (N, ..., ) linear
    bias: bool = True

    @property
    def depthwise(self) -> bool:
        return self.kind != "linear" and self.groups > 1 and self.groups == self.cin == self.cout

    def with_channels(self, cin: int | None = None, cout: int | None = None) -> OpSpec:
        """The same layer with other channel counts (a depthwise conv keeps groups == channels)."""
        cin = self.cin if cin is None else int(cin)
        cout = self.cout if cout is None else int(cout)
        groups = self.groups
        if self.depthwise:
            if cin != cout:
                raise ValueError(f"depthwise conv: cin {cin} != cout {cout}")
            groups = cin
        return replace(self, cin=cin, cout=cout, groups=groups)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def macs(self) -> int:
        n = 1
        for d in self.out_spatial():
            n *= d
        k = 1
        for d in self.kernel:
            k *= d
        return n * self.cout * (self.cin // self.groups) * k

    def out_spatial(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.in_shape
        out = [self.in_shape[0]]
        for i, d in enumerate(self.in_shape[1:]):
            k, s, p, dl = self.kernel[i], self.stride[i], self.padding[i], self.dilation[i]
            out.append((d + 2 * p - dl * (k - 1) - 1) // s + 1)
        return tuple(out)


def _spec_of(m: nn.Module, x: torch.Tensor) -> OpSpec | None:
    if isinstance(m, nn.Linear):
        return OpSpec("linear", m.in_features, m.out_features, in_shape=tuple(x.shape[:-1]), bias=m.bias is not None)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and isinstance(m.padding, tuple):
        kind = "conv2d" if isinstance(m, nn.Conv2d) else "conv1d"
        shape = (x.shape[0], *x.shape[2:]) if x.dim() == m.weight.dim() else (1, *x.shape[1:])
        return OpSpec(kind, m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding),
                      tuple(m.dilation), m.groups, tuple(int(d) for d in shape), m.bias is not None)
    return None


def collect_op_specs(model: nn.Module, example_inputs: Any) -> dict[str, OpSpec]:
    """Module name -> ``OpSpec`` of every Conv1d/Conv2d/Linear the forward pass of ``example_inputs`` calls (with
    the input shape it really gets; the first call when a module is called several times)."""
    specs: dict[str, OpSpec] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                if name not in specs and args and isinstance(args[0], torch.Tensor):
                    s = _spec_of(mod, args[0])
                    if s is not None:
                        specs[name] = s
            hooks.append(m.register_forward_pre_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return specs


# ----------------------------------------------------------------------------------------------- timing one layer
def _module_of(spec: OpSpec) -> nn.Module:
    if spec.kind == "linear":
        return nn.Linear(spec.cin, spec.cout, bias=spec.bias)
    cls = nn.Conv2d if spec.kind == "conv2d" else nn.Conv1d
    return cls(spec.cin, spec.cout, spec.kernel, spec.stride, spec.padding, spec.dilation, spec.groups, bias=True)


def _input_of(spec: OpSpec) -> torch.Tensor:
    if spec.kind == "linear":
        return torch.randn(*spec.in_shape, spec.cin)
    return torch.randn(spec.in_shape[0], spec.cin, *spec.in_shape[1:])


def eager_timer(threads: int, runs: int = 7, warmup: int = 2) -> Timer:
    """Times one layer in torch eager (inference mode, ``threads`` threads, channels_last for 2-d convs: the layout
    of :func:`inference_copy`)."""
    def timer(spec: OpSpec) -> float:
        m, x = _module_of(spec).eval(), _input_of(spec)
        if spec.kind == "conv2d":
            m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return _min_ms(lambda: m(x), runs, warmup)
        finally:
            torch.set_num_threads(old)
    return timer


def onnx_op_model(spec: OpSpec) -> bytes:
    """A one-op ONNX model (Conv, or MatMul + Add) of ``spec``, serialised, with random weights."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if spec.kind == "linear":
        w = numpy_helper.from_array(rng.standard_normal((spec.cin, spec.cout), dtype=np.float32), "W")
        b = numpy_helper.from_array(np.zeros(spec.cout, np.float32), "B")
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
        in_shape = [*spec.in_shape, spec.cin]
    else:
        w = numpy_helper.from_array(
            rng.standard_normal((spec.cout, spec.cin // spec.groups, *spec.kernel), dtype=np.float32), "W")
        b = numpy_helper.from_array(np.zeros(spec.cout, np.float32), "B")
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=list(spec.kernel),
                                  strides=list(spec.stride), pads=list(spec.padding) * 2,
                                  dilations=list(spec.dilation), group=spec.groups)]
        in_shape = [spec.in_shape[0], spec.cin, *spec.in_shape[1:]]
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def onnx_identity_model(shape: list[int]) -> bytes:
    """A one-op ONNX model copying its input (what a ``session.run`` costs besides the op: feeds, fetches)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def onnxruntime_timer(threads: int, runs: int = 7, warmup: int = 2) -> Timer:
    """Times one layer as a one-op ONNX graph in ONNX Runtime (CPU, all optimisations, ``threads`` intra-op
    threads; no spinning under ``OMP_WAIT_POLICY=PASSIVE``, like ``prunekit.export.onnx.ort_session``).

    A ``session.run`` costs more than its op (feeding the input, fetching the output: tens of microseconds, more
    than a small layer); inside a whole model that cost is paid once, not per layer, so the time of an Identity
    graph on the same input is subtracted (the entry keeps at least 5% of the raw time)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--latency-backend onnxruntime: onnxruntime is not installed; pip install "
                          "'prunekit[export]'") from None

    def session(model: bytes) -> Any:
        return ort.InferenceSession(model, sess_options=ort_session_options(threads),
                                    providers=["CPUExecutionProvider"])

    overhead: dict[tuple[int, ...], float] = {}

    def timer(spec: OpSpec) -> float:
        x = _input_of(spec).numpy()
        feeds = {"x": x}
        if x.shape not in overhead:
            ident = session(onnx_identity_model(list(x.shape)))
            overhead[x.shape] = _min_ms(lambda: ident.run(None, feeds), runs * 2, warmup)
        sess = session(onnx_op_model(spec))
        raw = _min_ms(lambda: sess.run(None, feeds), runs, warmup)
        return max(raw - overhead[x.shape], 0.05 * raw)
    return timer


# ----------------------------------------------------------------------------------------------- the table
def environment(backend: str, threads: int) -> dict[str, Any]:
    """What a table's figures depend on besides the layer: backend, threads, CPU, library versions."""
    from prunekit.measure.hardware import cpu_flags

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {"backend": backend, "threads": int(threads), "cpu": cpu, "machine": platform.machine(),
                           "simd": sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16",
                                                                           "amx_tile", "asimd", "sve")),
                           "torch": torch.__version__, "table_version": 2}
    if backend.endswith("-int8"):  # how each layer is quantized is part of what its figure means
        from prunekit.measure.latency_int8 import int8_environment

        env.update(int8_environment(backend))
    if backend.startswith("onnxruntime"):
        try:
            import onnxruntime

            env["onnxruntime"] = onnxruntime.__version__
        except ImportError:
            pass
    return env


def default_cache_dir() -> Path:
    """``$PRUNEKIT_CACHE_DIR/latency`` or ``~/.cache/prunekit/latency``."""
    root = os.environ.get("PRUNEKIT_CACHE_DIR")
    return Path(root) / "latency" if root else Path.home() / ".cache" / "prunekit" / "latency"


def make_timer(backend: str, threads: int, runs: int, warmup: int) -> Timer:
    """The real single-layer timer of ``backend`` (one of ``LUT_BACKENDS``)."""
    from prunekit.measure import latency_int8 as i8
    from prunekit.measure import latency_ov as ov

    timers = {"eager": eager_timer, "onnxruntime": onnxruntime_timer, "onnxruntime-int8": i8.onnxruntime_int8_timer,
              "openvino-int8": ov.openvino_int8_timer}
    return timers[backend](threads, runs, warmup)


class LatencyTable:
    """Measured single-layer latencies (ms) for one backend and thread count, cached on disk.

    Args:
        backend: ``eager``, ``onnxruntime``, ``onnxruntime-int8`` or ``openvino-int8`` (``LUT_BACKENDS``).
        threads: intra-op threads the layers are timed with (time the model with the same number).
        cache_dir: folder of the JSON cache (default :func:`default_cache_dir`); None with ``cache=False``.
        cache: read and write the cache file.
        timer: ``spec -> ms``, replaces the real timer (tests; the cache key then gets ``"timer": "custom"``).
        runs, warmup: timed / untimed calls per entry (``runs`` split over the repeats).
        repeats: separate timings of each entry; the entry is their minimum, ``spreads`` their (lowest, highest).
    """

    def __init__(self, backend: str = "eager", threads: int = 2, cache_dir: str | Path | None = None,
                 cache: bool = True, timer: Timer | None = None, runs: int = 7, warmup: int = 2,
                 repeats: int = 2) -> None:
        if backend not in LUT_BACKENDS:
            raise ConfigError(f"--latency-backend {backend!r}: a latency table can be built for "
                              f"{', '.join(LUT_BACKENDS)} (valid choices)")
        if repeats < 1:
            raise ConfigError(f"latency table repeats {repeats}: need at least 1")
        if threads < 1:
            raise ConfigError(f"--latency-threads {threads}: need at least 1 thread")
        self.backend, self.threads = backend, int(threads)
        self.env = environment(backend, threads)
        if timer is not None:
            self.env["timer"] = "custom"
        self.repeats = int(repeats)
        self._timer = timer or make_timer(backend, self.threads, max(2, -(-runs // self.repeats)), warmup)
        self.entries: dict[str, float] = {}
        self.spreads: dict[str, tuple[float, float]] = {}  # key -> (lowest, highest) repeat, ms
        self.hits = self.measured = 0
        self.build_seconds = 0.0
        digest = hashlib.sha1(json.dumps(self.env, sort_keys=True).encode()).hexdigest()[:12]
        self.path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{backend}-t{threads}-{digest}.json" \
            if cache else None
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("env") == self.env:
                    self.entries = {k: float(v) for k, v in data.get("entries", {}).items()}
                    self.spreads = {k: (float(a), float(b)) for k, (a, b) in data.get("spread", {}).items()}
            except (OSError, ValueError) as e:
                log.warning("latency table %s unreadable (%s): rebuilding it", self.path, e)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, spec: OpSpec) -> float | None:
        return self.entries.get(spec.key())

    def __getitem__(self, spec: OpSpec) -> float:
        v = self.get(spec)
        if v is None:
            raise KeyError(f"{spec} is not in the latency table (call measure() first)")
        return v

    def measure(self, specs: Iterable[OpSpec], what: str = "layers") -> None:
        """Time the ``specs`` not in the table yet (logging progress), then save the table."""
        todo, seen = [], set()
        for s in specs:
            k = s.key()
            if k in self.entries:
                self.hits += 1
            elif k not in seen:
                seen.add(k)
                todo.append(s)
        if not todo:
            return
        t0 = last = time.perf_counter()
        log.info("latency table (%s, %d threads): timing %d %s configurations (%d in the table already)", self.backend,
                 self.threads, len(todo), what, len(self.entries))
        try:
            for i, s in enumerate(todo):
                ts = [float(self._timer(s)) for _ in range(self.repeats)]
                self.entries[s.key()], self.spreads[s.key()] = min(ts), (min(ts), max(ts))
                self.measured += 1
                if time.perf_counter() - last > 15:
                    last = time.perf_counter()
                    log.info("latency table: %d/%d timed (%.0f s)", i + 1, len(todo), last - t0)
        finally:
            self.build_seconds += time.perf_counter() - t0
            self.save()
        log.info("latency table: %d entries timed in %.1f s -> %s", len(todo), time.perf_counter() - t0,
                 self.path or "(not cached)")

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"env": self.env, "entries": self.entries,
                                   "spread": {k: list(v) for k, v in self.spreads.items()}}))
        os.replace(tmp, self.path)

    def spread(self) -> dict[str, float]:
        """Spread across repeats, (highest - lowest) / lowest repeat: median and largest over the entries."""
        rel = sorted((hi - lo) / lo for lo, hi in self.spreads.values() if lo > 0)
        if not rel:
            return {"entries": 0, "median": 0.0, "max": 0.0}
        return {"entries": len(rel), "median": rel[len(rel) // 2], "max": rel[-1]}
