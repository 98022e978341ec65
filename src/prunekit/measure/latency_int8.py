"""Latency tables of int8 kernels: single layers quantized as ``prunekit quantize`` quantizes a model, then timed.

``onnxruntime-int8``: each one-op ONNX graph of ``prunekit.measure.latency_table.onnx_op_model`` is quantized with
ONNX Runtime's static quantizer in QDQ format with the settings ``prunekit quantize`` uses by default
(:data:`ORT_INT8`: per-channel int8 weights, uint8 activations, min-max calibration on :data:`CALIB_BATCHES` random
batches of the layer's input shape). ONNX Runtime turns ``DequantizeLinear -> Conv -> QuantizeLinear`` into one
``QLinearConv`` (``QLinearMatMul`` + ``QLinearAdd`` for a linear layer) and wraps it in the layout changes and
(de)quantization of the graph's float input and output, which inside a whole int8 network happen once, not per
layer. So an entry is not a wall time: it is ONNX Runtime's own per-node profile of the session, the kernel times
of every node but those boundary nodes (:data:`BOUNDARY_OPS`), summed. The profile counts whole microseconds, as
long as a small int8 layer takes (ResNet-20's: 5-12 us), so a minimum would round every small entry to a
microsecond; each node's figure is instead the mean of its fastest half of :data:`RUNS_FACTOR` x ``runs`` runs
(the jitter between runs resolves fractions of a microsecond; the slow half, where other jobs interfered, is
dropped).

x86 int8 kernels (VNNI) work in other blocks than fp32 ones (4 input channels times 16 output channels per
instruction with AVX-512 VNNI): the int8 table's grid is a multiple of :data:`INT8_ROUND_TO` instead of the fp32
SIMD block (every 4 channels up to 64, then ``channel_grid``'s 8 / 16), and the steps it finds are the int8 kernels'
own.

Example:
    >>> table = LatencyTable("onnxruntime-int8", threads=2)      # cached per CPU model and ONNX Runtime version
    >>> table.measure([spec.with_channels(cout=48)])
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.measure.inference import ort_session_options

log = logging.getLogger(__name__)

# The defaults of prunekit.quantize.QuantizeConfig for backend onnxruntime (a test keeps the two equal).
ORT_INT8 = {"format": "QDQ", "per_channel": True, "activation_type": "uint8", "weight_type": "int8",
            "reduce_range": False, "calibrate_method": "minmax"}
CALIB_BATCHES = 4
RUNS_FACTOR = 3  # an int8 entry profiles this many times the runs of a float one (cheap: one session per entry)
STAT = "mean of the fastest half of the per-node kernel times"
INT8_ROUND_TO = 4  # grid multiple of the int8 tables: VNNI's block of input channels (the table finds the rest)
BOUNDARY_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Transpose"})
INT8_TIMED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                            "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv"})
INSTALL = "pip install 'prunekit[quantize]' (or: pip install onnxruntime onnx)"


def int8_environment(backend: str) -> dict[str, Any]:
    """What an int8 table's figures depend on besides the CPU: how each layer is quantized and timed (and the
    OpenVINO version for ``openvino-int8``)."""
    if backend == "openvino-int8":
        from prunekit.measure.latency_ov import ov_environment

        return ov_environment()
    return {"int8": {**ORT_INT8, "calib_batches": CALIB_BATCHES, "stat": STAT}}


def require_quantizer(backend: str = "onnxruntime-int8") -> Any:
    """``onnxruntime.quantization``, or a ``ConfigError`` naming the flag and the pip install."""
    try:
        import onnx  # noqa: F401
        from onnxruntime import quantization
    except ImportError as e:
        raise ConfigError(f"--latency-backend {backend}: onnxruntime (with its quantizer) is not installed; "
                          f"{INSTALL} ({type(e).__name__}: {e})") from None
    return quantization


def quantize_onnx(float_model: bytes, feeds: list[dict[str, np.ndarray]], preprocess: bool = False) -> bytes:
    """The QDQ int8 model (:data:`ORT_INT8` settings) of the serialised float model, calibrated on ``feeds``."""
    q = require_quantizer()
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice goes to the root logger
    failed = ""
    try:
        with tempfile.TemporaryDirectory(prefix="prunekit-int8-") as tmp:
            src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(float_model)
            if preprocess:
                try:
                    q.quant_pre_process(str(src), str(Path(tmp) / "pre.onnx"), skip_symbolic_shape=True)
                    src = Path(tmp) / "pre.onnx"
                except Exception as e:  # an exotic graph: quantize it as exported, like prunekit quantize does
                    failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            q.quantize_static(str(src), str(dst), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=ORT_INT8["per_channel"], reduce_range=ORT_INT8["reduce_range"],
                              activation_type=qtype[ORT_INT8["activation_type"]],
                              weight_type=qtype[ORT_INT8["weight_type"]], calibrate_method=q.CalibrationMethod.MinMax)
            out = dst.read_bytes()
    finally:
        root.setLevel(level)
    if failed:  # said once the root logger's level is back
        log.warning("latency table: onnxruntime pre-processing failed (%s); the graph was quantized as it is", failed)
    return out


def int8_op_model(spec: Any, calib_batches: int = CALIB_BATCHES) -> bytes:
    """The one-op graph of ``spec`` (an ``OpSpec``) quantized to QDQ int8, serialised."""
    from prunekit.measure.latency_table import _input_of, onnx_op_model

    gen = torch.Generator().manual_seed(0)
    shape = tuple(_input_of(spec).shape)
    feeds = [{"x": torch.randn(shape, generator=gen).numpy()} for _ in range(calib_batches)]
    return quantize_onnx(onnx_op_model(spec), feeds)


def profile_nodes(model: bytes | str, feeds: dict[str, np.ndarray], threads: int, runs: int,
                  warmup: int = 2, fastest_half: bool = False) -> dict[str, tuple[float, str]]:
    """Node name -> (minimum kernel time in ms over the runs, op type), from ONNX Runtime's profile of the model
    (all graph optimisations: the names and ops are those of the optimised graph). ``fastest_half``: the mean of
    the fastest half of the runs instead of the minimum (sub-microsecond resolution)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="prunekit-prof-") as tmp:
        so = ort_session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = f"{tmp}/profile"
        sess = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
        for _ in range(runs + warmup):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        times.setdefault(name, []).append(e["dur"] / 1e3)
        ops[name] = e.get("args", {}).get("op_name", "")
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = (float(np.mean(ts[: max(1, len(ts) // 2)])) if fastest_half else ts[0], ops[name])
    return out


def onnxruntime_int8_timer(threads: int, runs: int = 7, warmup: int = 2) -> Callable[[Any], float]:
    """Times one layer's int8 kernels in ONNX Runtime: the summed per-node kernel minima of its quantized one-op
    graph, boundary nodes left out (see the module doc)."""
    require_quantizer()

    def timer(spec: Any) -> float:
        from prunekit.measure.latency_table import _input_of

        nodes = profile_nodes(int8_op_model(spec), {"x": _input_of(spec).numpy()}, threads, runs * RUNS_FACTOR,
                              warmup, fastest_half=True)
        timed = [ms for ms, op in nodes.values() if op not in BOUNDARY_OPS]
        if not timed:
            raise ConfigError(f"--latency-backend onnxruntime-int8: ONNX Runtime ran no int8 kernel for {spec}")
        return float(sum(timed))
    return timer


# ----------------------------------------------------------------------------------------------- whole models
def export_int8(model: nn.Module, example_inputs: Any, path: str | Path, calib_batches: int = CALIB_BATCHES) -> Path:
    """``model`` exported to float ONNX and quantized like the layers of the table (QDQ, :data:`ORT_INT8`), its
    activations calibrated on ``example_inputs`` plus ``calib_batches - 1`` noisy copies; written to ``path``."""
    from prunekit.export.core import ExportOptions, as_tensors, output_names, positional
    from prunekit.export.onnx import OnnxRunner, export_onnx

    require_quantizer()
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="prunekit-int8-") as tmp:
        fpath = Path(tmp) / "model.onnx"
        m = copy.deepcopy(model).cpu().eval()
        module, names, args, prefix = positional(m, example_inputs)
        with torch.no_grad():
            outs = output_names(len(as_tensors(module(*args))))
        export_onnx(module, args, names, outs, fpath, ExportOptions(dynamic_batch=False), prefix)
        runner = OnnxRunner(fpath, 1)
        gen = torch.Generator().manual_seed(0)
        batches = [args] + [tuple(a + 0.1 * a.std() * torch.randn(a.shape, generator=gen) if a.is_floating_point()
                                  else a for a in args) for _ in range(calib_batches - 1)]
        feeds = [runner.feeds(*b) for b in batches]
        path.write_bytes(quantize_onnx(fpath.read_bytes(), feeds, preprocess=True))
    return path


def int8_rest_latency_ms(model: nn.Module, example_inputs: Any, threads: int, runs: int = 15) -> float:
    """What an int8 table of layers does not time in ``model`` quantized (:func:`export_int8`): ONNX Runtime's
    per-node kernel minima of every node that is not an int8 conv / matmul (quantize at the input, residual adds,
    pooling, layout changes), summed."""
    from prunekit.export.core import positional
    from prunekit.export.onnx import OnnxRunner

    with tempfile.TemporaryDirectory(prefix="prunekit-int8-") as tmp:
        path = export_int8(model, example_inputs, Path(tmp) / "int8.onnx")
        _, _, args, _ = positional(copy.deepcopy(model).cpu().eval(), example_inputs)
        feeds = OnnxRunner(path, 1).feeds(*args)
        nodes = profile_nodes(str(path), feeds, threads, runs)
    return float(sum(ms for ms, op in nodes.values() if op not in INT8_TIMED_OPS))


def rest_latency_ms(model: nn.Module, example_inputs: Any, backend: str, threads: int, runs: int = 15) -> float:
    """What a table of ``backend`` does not time in ``model``: :func:`int8_rest_latency_ms` for
    ``onnxruntime-int8``, ``latency_ov.ov_rest_latency_ms`` for ``openvino-int8``,
    ``prunekit.measure.inference.rest_latency_ms`` for the float backends."""
    from prunekit.measure.inference import rest_latency_ms as float_rest
    from prunekit.measure.latency_ov import ov_rest_latency_ms

    if backend == "onnxruntime-int8":
        return int8_rest_latency_ms(model, example_inputs, threads, runs)
    if backend == "openvino-int8":
        return ov_rest_latency_ms(model, example_inputs, threads, runs)
    return float_rest(model, example_inputs, backend, threads, runs)


def int8_calls(models: dict[str, nn.Module], example_inputs: Any, threads: int, folder: str | Path
               ) -> dict[str, Callable[[], Any]]:
    """Every model quantized (:func:`export_int8`) into ``folder`` and loaded in ONNX Runtime: name -> ``fn()``
    running one batch (feeds made once, outside the call)."""
    from prunekit.export.core import positional
    from prunekit.export.onnx import OnnxRunner

    fns = {}
    for i, (name, m) in enumerate(models.items()):
        runner = OnnxRunner(export_int8(m, example_inputs, Path(folder) / f"model{i}_int8.onnx"), threads)
        _, _, args, _ = positional(copy.deepcopy(m).cpu().eval(), example_inputs)
        sess, feeds = runner.session, runner.feeds(*args)
        fns[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
    return fns


def compare_int8_latency(models: dict[str, nn.Module], example_inputs: Any, threads: int, runs: int = 20,
                         rounds: int = 10, backend: str = "onnxruntime-int8") -> dict[str, Any]:
    """Every model quantized and timed alternately: ``{name: LatencyStats}`` (per-round medians give the spread
    across repeats). ``onnxruntime-int8``: :func:`int8_calls`; ``openvino-int8``: ``latency_ov.ov_int8_calls``."""
    from prunekit.batch import batch_size_of
    from prunekit.measure.latency_ov import ov_int8_calls

    with tempfile.TemporaryDirectory(prefix="prunekit-int8-") as tmp:
        fns = ov_int8_calls(models, example_inputs, threads) if backend == "openvino-int8" else \
            int8_calls(models, example_inputs, threads, tmp)
        return paired(fns, batch_size_of(example_inputs), runs, rounds, threads, backend)


def paired(fns: dict[str, Callable[[], Any]], batch: int, runs: int, rounds: int, threads: int,
           backend: str = "onnxruntime-int8") -> dict[str, Any]:
    """Alternate timing of ready calls, A B B A ... (``measure.latency.summarize`` statistics per name)."""
    import statistics
    import time

    from prunekit.measure.latency import summarize

    names = list(fns)
    for n in names:
        for _ in range(3):
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    rounds = max(1, min(rounds, runs))
    for r in range(rounds):
        k = runs // rounds + (1 if r < runs % rounds else 0)
        for n in names if r % 2 == 0 else names[::-1]:
            fns[n]()
            ts = []
            for _ in range(k):
                t0 = time.perf_counter()
                fns[n]()
                ts.append(time.perf_counter() - t0)
            times[n] += ts
            per_round[n].append(statistics.median(ts))
    return {n: summarize(times[n], batch, backend, threads, 3, per_round[n]) for n in names}
