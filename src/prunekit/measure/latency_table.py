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

Each entry is the *minimum* over ``runs`` timed calls after ``warmup`` calls: on a shared machine the minimum is the
estimate least moved by other jobs (they only ever add time), which is what a table of a layer's intrinsic cost
needs; whole-model comparisons use paired medians instead (``prunekit.measure.latency.compare_latency``).

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

import copy
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

from prunekit.errors import ConfigError
from prunekit.measure.macs import call_model

log = logging.getLogger(__name__)
LUT_BACKENDS = ("eager", "onnxruntime")
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


def _min_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


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
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        so.log_severity_level = 3
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])

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
    if backend == "onnxruntime":
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


class LatencyTable:
    """Measured single-layer latencies (ms) for one backend and thread count, cached on disk.

    Args:
        backend: ``eager`` or ``onnxruntime``.
        threads: intra-op threads the layers are timed with (time the model with the same number).
        cache_dir: folder of the JSON cache (default :func:`default_cache_dir`); None with ``cache=False``.
        cache: read and write the cache file.
        timer: ``spec -> ms``, replaces the real timer (tests; the cache key then gets ``"timer": "custom"``).
        runs, warmup: timed / untimed calls per entry.
    """

    def __init__(self, backend: str = "eager", threads: int = 2, cache_dir: str | Path | None = None,
                 cache: bool = True, timer: Timer | None = None, runs: int = 7, warmup: int = 2) -> None:
        if backend not in LUT_BACKENDS:
            raise ConfigError(f"--latency-backend {backend!r}: a latency table can be built for "
                              f"{', '.join(LUT_BACKENDS)}")
        if threads < 1:
            raise ConfigError(f"--latency-threads {threads}: need at least 1 thread")
        self.backend, self.threads = backend, int(threads)
        self.env = environment(backend, threads)
        if timer is not None:
            self.env["timer"] = "custom"
        self._timer = timer or (eager_timer if backend == "eager" else onnxruntime_timer)(self.threads, runs, warmup)
        self.entries: dict[str, float] = {}
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
                self.entries[s.key()] = float(self._timer(s))
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
        tmp.write_text(json.dumps({"env": self.env, "entries": self.entries}))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------- eager inference
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv (as the next module in a ``Sequential`` or as the
    ``bnN`` attribute after ``convN``, torchvision / CIFAR ResNet style) into that conv, in place; the BN becomes
    ``nn.Identity``. Exact in eval mode (running statistics). Returns the number folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    convs = (nn.Conv1d, nn.Conv2d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d)
    for parent in list(model.modules()):
        children = list(parent.named_children())
        pairs = []
        if isinstance(parent, nn.Sequential):
            pairs = [(a, b) for (a, ma), (b, mb) in zip(children, children[1:], strict=False)
                     if isinstance(ma, convs) and isinstance(mb, bns)]
        else:
            names = dict(children)
            for n, m in children:
                if isinstance(m, convs) and n.startswith("conv"):
                    b = "bn" + n[4:]
                    if isinstance(names.get(b), bns):
                        pairs.append((n, b))
        for a, b in pairs:
            conv, bn = getattr(parent, a), getattr(parent, b)
            if bn.training or not bn.track_running_stats or bn.running_mean is None:
                continue
            if bn.num_features != conv.out_channels:
                continue
            setattr(parent, a, fuse_conv_bn_eval(conv, bn))
            setattr(parent, b, nn.Identity())
            folded += 1
    return folded


def inference_copy(model: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> tuple[nn.Module, str]:
    """An eval-mode copy of ``model`` prepared for eager CPU inference, and a line saying what was done.

    ``fold_bn``: BatchNorm folded into the conv before it (exact in eval mode; the model a user fine-tunes is not
    touched, only this copy). ``channels_last``: 4-d weights and activations in NHWC, which oneDNN's CPU convolutions
    run without reordering them at every call. Call :func:`channels_last_inputs` on the inputs too.
    """
    m = copy.deepcopy(model).eval()
    done = []
    if fold_bn:
        n = fold_batchnorm(m)
        done.append(f"{n} BatchNorm folded into convs")
    if channels_last and any(isinstance(x, nn.Conv2d) for x in m.modules()):
        m = m.to(memory_format=torch.channels_last)
        done.append("channels_last")
    return m, "eager inference: " + (", ".join(done) if done else "model as is")


def channels_last_inputs(inputs: Any) -> Any:
    """4-d tensors of ``inputs`` in channels_last (others unchanged)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs
    if isinstance(inputs, dict):
        return {k: channels_last_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(channels_last_inputs(v) for v in inputs)
    return inputs


# ----------------------------------------------------------------------------------------------- the rest of a model
class _Canned(nn.Module):
    """Stands in for a conv/linear layer: returns the output it recorded (what the layer costs is in the table)."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.out


TIMED_ONNX_OPS = frozenset({"Conv", "FusedConv", "NchwcConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"})


def rest_latency_ms(model: nn.Module, example_inputs: Any, backend: str, threads: int, runs: int = 15) -> float:
    """Latency (ms) of everything in ``model`` but its conv/linear layers on ``backend``: what a table of layers
    does not time (activations, adds, pooling, layout reorders, per-op overhead), measured like the table's
    entries, by short minima that other jobs on a shared machine hardly move.

    ``eager``: the :func:`inference_copy` with every Conv1d/Conv2d/Linear replaced by a module returning its recorded
    output, timed whole (minimum over ``runs``). ``onnxruntime``: the model exported once and profiled by ONNX
    Runtime over ``runs`` runs; the minimum duration of each node that is not a conv / matmul, summed.
    """
    if backend == "eager":
        m, _ = inference_copy(model)
        x = channels_last_inputs(example_inputs)
        outs: dict[str, torch.Tensor] = {}
        hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: outs.setdefault(n, o))
                 for n, mod in m.named_modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        with torch.inference_mode():
            call_model(m, x)
        for h in hooks:
            h.remove()
        for name, out in outs.items():
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, _Canned(out))
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return _min_ms(lambda: call_model(m, x), runs, 3)
        finally:
            torch.set_num_threads(old)
    if backend != "onnxruntime":
        raise ConfigError(f"--latency-backend {backend!r}: valid: {', '.join(LUT_BACKENDS)}")
    nodes = onnx_node_times(model, example_inputs, threads, runs)
    return float(sum(ms for ms, op in nodes.values() if op not in TIMED_ONNX_OPS))


def onnx_node_times(model: nn.Module, example_inputs: Any, threads: int,
                    runs: int = 15) -> dict[str, tuple[float, str]]:
    """Node name -> (minimum kernel time in ms over ``runs`` runs, op type) of ``model`` exported to ONNX and run by
    ONNX Runtime (all graph optimisations, so the names are those of the optimised graph: fused and NCHWc nodes).
    The names keep the exporter's module path (``/layer1/layer1.0/conv1/Conv``): what per-layer figures of a
    whole-model ONNX Runtime run are read from."""
    import tempfile

    import onnxruntime as ort

    from prunekit.export.core import ExportOptions, as_tensors, output_names, positional
    from prunekit.export.onnx import OnnxRunner, export_onnx

    with tempfile.TemporaryDirectory(prefix="prunekit-nodes-") as tmp:
        path = f"{tmp}/model.onnx"
        m = copy.deepcopy(model).eval()
        module, names, args, prefix = positional(m, example_inputs)
        with torch.no_grad():
            outs_ = output_names(len(as_tensors(module(*args))))
        export_onnx(module, args, names, outs_, path, ExportOptions(dynamic_batch=False), prefix)
        feeds = OnnxRunner(path, threads).feeds(*args)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        so.log_severity_level = 3
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = f"{tmp}/profile"
        sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 2):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    best: dict[str, tuple[float, str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        ms = e["dur"] / 1e3
        if name not in best or ms < best[name][0]:
            best[name] = (ms, e.get("args", {}).get("op_name", ""))
    return best
