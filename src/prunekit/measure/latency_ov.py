"""Latency tables of OpenVINO's int8 kernels (``--latency-backend openvino-int8``; optional: ``openvino``, ``nncf``).

``nncf.quantize`` takes 1.5-3 s per one-op model (statistics collection), too slow for a table of thousands of
layer widths; so each layer is built directly as the graph NNCF's ``performance`` preset produces around a conv:
``FakeQuantize`` (256 levels, ``[0, 4]``: a post-ReLU uint8 activation) on the input, per-output-channel symmetric
``FakeQuantize`` (255 levels) on the weights, the conv (or group conv, or MatMul + Add), float output. OpenVINO's
CPU plugin fuses that into the same int8 kernel (``brgconv_avx512_I8`` on an AVX-512 CPU) as NNCF's model; a test
checks the kernels agree. An entry is OpenVINO's own per-node profile (``PERF_COUNT``): the kernel times of every
executed node but the boundary ones (input quantization, layout reorders), summed; minimum over the runs.
Whole models (the rest of the model, the paired check) are quantized by NNCF itself.

Example:
    >>> table = LatencyTable("openvino-int8", threads=2)
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.errors import ConfigError

INSTALL = "pip install 'prunekit[quantize]' (or: pip install openvino nncf)"
BOUNDARY_OPS = frozenset({"Reorder", "Subgraph", "FakeQuantize", "Parameter", "Result", "Input", "Output", "Convert"})
KERNEL_OPS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")  # name prefixes
ACT_RANGE = (0.0, 4.0)


def require_openvino(with_nncf: bool = False) -> Any:
    """``openvino`` (and ``nncf``), or a ``ConfigError`` naming the flag and the pip install."""
    try:
        import openvino as ov

        if with_nncf:
            import nncf  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--latency-backend openvino-int8: openvino{' and nncf' if with_nncf else ''} not "
                          f"installed; {INSTALL} ({type(e).__name__}: {e})") from None
    return ov


def ov_environment() -> dict[str, Any]:
    """What an openvino-int8 table's figures depend on besides the CPU: the OpenVINO version, how layers are built."""
    env: dict[str, Any] = {"int8": {"graph": "FakeQuantize u8 activations [0, 4], per-channel symmetric int8 weights",
                                    "stat": "minimum per-node real time"}}
    try:
        import openvino

        env["openvino"] = openvino.__version__
    except ImportError:
        pass
    return env


def _fq(ops: Any, x: Any, lo: np.ndarray, hi: np.ndarray, levels: int) -> Any:
    lo, hi = ops.constant(lo.astype(np.float32)), ops.constant(hi.astype(np.float32))
    return ops.fake_quantize(x, lo, hi, lo, hi, levels)


def ov_op_model(spec: Any) -> Any:
    """The int8 one-op OpenVINO model of ``spec`` (an ``OpSpec``), as NNCF would quantize it (module doc)."""
    require_openvino()
    from openvino import Model
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    if spec.kind == "linear":
        shape = [*spec.in_shape, spec.cin]
        w = rng.standard_normal((spec.cin, spec.cout)).astype(np.float32)
        w_lim = np.abs(w).max(0, keepdims=True)
    else:
        shape = [spec.in_shape[0], spec.cin, *spec.in_shape[1:]]
        w = rng.standard_normal((spec.cout, spec.cin // spec.groups, *spec.kernel)).astype(np.float32)
        w_lim = np.abs(w).reshape(spec.cout, -1).max(1).reshape(-1, *[1] * (w.ndim - 1))
    x = ops.parameter(shape, np.float32, name="x")
    xq = _fq(ops, x, np.array(ACT_RANGE[0]), np.array(ACT_RANGE[1]), 256)
    wq = _fq(ops, ops.constant(w), -w_lim, w_lim, 255)
    if spec.kind == "linear":
        y = ops.add(ops.matmul(xq, wq, False, False), ops.constant(np.zeros(spec.cout, np.float32)))
    else:
        pads = list(spec.padding)
        if spec.groups > 1:
            g = spec.groups
            wq = ops.reshape(wq, ops.constant(np.array([g, spec.cout // g, spec.cin // g, *spec.kernel])), False)
            y = ops.group_convolution(xq, wq, list(spec.stride), pads, pads, list(spec.dilation))
        else:
            y = ops.convolution(xq, wq, list(spec.stride), pads, pads, list(spec.dilation))
        y = ops.add(y, ops.constant(np.zeros((1, spec.cout, *[1] * len(spec.kernel)), np.float32)))
    return Model([ops.result(y)], [x], "op")


def profile_ov(model: Any, feeds: list[np.ndarray], threads: int, runs: int, warmup: int = 2
               ) -> dict[str, tuple[float, str, str]]:
    """Node name -> (minimum real time in ms over the runs, node type, kernel), from OpenVINO's per-node profile
    of ``model`` compiled for the CPU (``threads`` inference threads, latency hint)."""
    ov = require_openvino()
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "PERF_COUNT": "YES",
                                                      "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    best: dict[str, tuple[float, str, str]] = {}
    for i in range(warmup + runs):
        req.infer(dict(enumerate(feeds)))
        if i < warmup:
            continue
        for p in req.get_profiling_info():
            if p.status.name != "EXECUTED":
                continue
            ms = p.real_time.total_seconds() * 1e3
            if p.node_name not in best or ms < best[p.node_name][0]:
                best[p.node_name] = (ms, p.node_type, p.exec_type)
    return best


def openvino_int8_timer(threads: int, runs: int = 7, warmup: int = 2) -> Callable[[Any], float]:
    """Times one layer's int8 kernels in OpenVINO (CPU): the summed per-node minima of its int8 one-op model,
    boundary nodes left out."""
    require_openvino()

    def timer(spec: Any) -> float:
        from prunekit.measure.latency_table import _input_of

        x = np.abs(_input_of(spec).numpy())  # post-ReLU-like, inside the activation range
        nodes = profile_ov(ov_op_model(spec), [x], threads, runs, warmup)
        timed = [ms for ms, kind, _ in nodes.values() if kind not in BOUNDARY_OPS]
        if not timed:
            raise ConfigError(f"--latency-backend openvino-int8: OpenVINO ran no kernel for {spec}")
        return float(sum(timed))
    return timer


# ----------------------------------------------------------------------------------------------- whole models
def nncf_int8(model: nn.Module, example_inputs: Any, calib_batches: int = 4) -> tuple[Any, list[np.ndarray]]:
    """``model`` exported to ONNX, converted to OpenVINO and quantized by ``nncf.quantize`` (performance preset) on
    ``example_inputs`` and noisy copies; returns (the int8 OpenVINO model, its feeds)."""
    ov = require_openvino(with_nncf=True)
    import nncf

    from prunekit.export.core import ExportOptions, as_tensors, output_names, positional
    from prunekit.export.onnx import export_onnx

    m = copy.deepcopy(model).cpu().eval()
    module, names, args, prefix = positional(m, example_inputs)
    with torch.no_grad():
        outs = output_names(len(as_tensors(module(*args))))
    with tempfile.TemporaryDirectory(prefix="prunekit-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(module, args, names, outs, path, ExportOptions(dynamic_batch=False), prefix)
        fmodel = ov.convert_model(str(path))
    feeds = [a.detach().numpy() for a in args]
    gen = torch.Generator().manual_seed(0)
    items = [dict(enumerate(feeds))] + [
        {i: a + 0.1 * a.std() * torch.randn(a.shape, generator=gen).numpy() for i, a in enumerate(feeds)}
        for _ in range(calib_batches - 1)]
    level = logging.getLogger("nncf").level
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        q = nncf.quantize(fmodel, nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                          subset_size=len(items))
    finally:
        logging.getLogger("nncf").setLevel(level)
    return q, feeds


def ov_rest_latency_ms(model: nn.Module, example_inputs: Any, threads: int, runs: int = 15) -> float:
    """What an openvino-int8 table does not time in ``model`` quantized by NNCF: the per-node minima of every
    executed node that is not a conv / matmul kernel, summed."""
    q, feeds = nncf_int8(model, example_inputs)
    nodes = profile_ov(q, feeds, threads, runs)
    return float(sum(ms for ms, kind, _ in nodes.values() if not kind.startswith(KERNEL_OPS)))


def ov_int8_calls(models: dict[str, nn.Module], example_inputs: Any, threads: int) -> dict[str, Callable[[], Any]]:
    """Every model quantized by NNCF and compiled for the CPU: name -> ``fn()`` running one batch."""
    ov = require_openvino(with_nncf=True)
    fns = {}
    for name, m in models.items():
        q, feeds = nncf_int8(m, example_inputs)
        req = ov.Core().compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                 "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        fns[name] = lambda req=req, f=dict(enumerate(feeds)): req.infer(f)
    return fns
