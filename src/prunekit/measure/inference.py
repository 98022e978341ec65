"""The model as it runs for eager CPU inference (BatchNorm folded, channels_last), and what a latency table of single
layers does not time: the rest of a model (activations, adds, pooling, reorders, per-op overhead), per runtime.

Example:
    >>> m, how = inference_copy(model)
    >>> rest_latency_ms(model, torch.randn(1, 3, 32, 32), "onnxruntime", threads=2)
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.batch import call_model
from prunekit.errors import ConfigError

# the runtimes timed layer by layer (prunekit.measure.latency_table; int8: measure.latency_int8, latency_ov)
LUT_BACKENDS = ("eager", "onnxruntime", "onnxruntime-int8", "openvino-int8")


def min_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    """The minimum wall time of ``fn()`` in ms over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3



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


def ort_session_options(threads: int) -> Any:
    """ONNX Runtime session options of every CPU timing here: all graph optimisations, sequential, ``threads``
    intra-op threads, no spinning under ``OMP_WAIT_POLICY=PASSIVE``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
    so.log_severity_level = 3
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


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
                return min_ms(lambda: call_model(m, x), runs, 3)
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
        so = ort_session_options(threads)
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
