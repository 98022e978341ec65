"""What the quantizers share: the float ONNX model, its quantizable layers by name, calibration feeds, and the
checks that refuse a corrupt, an already quantized or a float-only model.

A *layer* is named after its torch module where the exporter kept the weight's name (``layer1.0.conv1``, the
``.weight`` initializer of a Conv / Gemm / MatMul node), else after the ONNX node. ``keep_float`` regexes match a
layer like ``--only`` / ``--ignore`` match modules: the whole name or the name of a parent (``layer4`` covers
``layer4.0.conv1``), or the ONNX node name.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit.batch import split_batch
from prunekit.errors import ConfigError, ExportError, PrunekitError, compile_patterns
from prunekit.export.core import ExportOptions, as_tensors, flatten_inputs, output_names, positional
from prunekit.quantize.extras import require

QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT8_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layer:
    """A quantizable ONNX node and the torch layer it came from."""

    name: str  # torch module name (``layer1.0.conv1``), else the node name
    node: str  # ONNX node name
    op: str  # Conv, Gemm, MatMul, ...


# ----------------------------------------------------------------------------------------------- float model
def export_float(model: nn.Module, example_inputs: Any, path: Path, opset: int = 18) -> dict[str, Any]:
    """Export ``model`` (a CPU copy, eval mode) to float ONNX at ``path`` with the project's exporter."""
    from prunekit.export.onnx import export_onnx

    model = _cpu_eval(model)
    module, names, args, prefix = positional(model, example_inputs)
    args = tuple(a.cpu() for a in args)
    with torch.no_grad():
        outs = output_names(len(as_tensors(module(*args))))
    return export_onnx(module, args, names, outs, Path(path), ExportOptions(opset=opset), prefix)


def _cpu_eval(model: nn.Module) -> nn.Module:
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        import copy

        model = copy.deepcopy(model).to("cpu")
    return model.eval()


def load_onnx(path: str | Path, what: str = "model") -> Any:
    """The ONNX model at ``path``; a missing or corrupt file is an ``ExportError`` naming it."""
    onnx = require("onnx")
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{what}: {str(p)!r} does not exist")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{what}: {str(p)!r} is not a valid ONNX model ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    return model


def int8_nodes(model: Any) -> int:
    """How many quantize / dequantize / integer nodes an ONNX model holds (0: a float-only model)."""
    return sum(n.op_type in INT8_OPS for n in model.graph.node)


def check_float(model: Any, path: str | Path) -> None:
    """Refuse a model that is already quantized (quantizing it again would quantize the int8 graph's float ops)."""
    n = int8_nodes(model)
    if n:
        raise ConfigError(f"{str(path)!r} is already quantized ({n} quantize / dequantize / integer nodes); "
                          "quantize its float model instead")


def check_int8(model: Any, path: str | Path, keep_float: list[str] = ()) -> None:
    """Refuse an 'int8' model with no int8 node (every layer left in float, or a quantizer that did nothing)."""
    if not int8_nodes(model):
        hint = f" (keep_float {list(keep_float)!r} leaves every layer in float)" if keep_float else ""
        raise ConfigError(f"{str(path)!r} holds no int8 node: the quantized model is float only{hint}")


# ----------------------------------------------------------------------------------------------- layers
def layers(model: Any) -> list[Layer]:
    """The quantizable layers of a float ONNX model, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANTIZABLE:
            continue
        out.append(Layer(_layer_name(n, inits), n.name, n.op_type))
    return out


def _layer_name(node: Any, inits: set[str]) -> str:
    weight = next((i for i in node.input[1:2] if i in inits), None)
    if weight and weight.endswith(".weight"):
        return weight[: -len(".weight")]
    meta = {p.key: p.value for p in node.metadata_props}
    try:  # the dynamo exporter's module scopes: ['', 'layer1', '0', 'conv1', 'conv2d']
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        name = ".".join(s for s in scopes[:-1] if s)
    except (ValueError, SyntaxError):
        name = ""
    return name or node.name


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def match_layers(all_layers: list[Layer], patterns: Iterable[str], option: str = "keep_float") -> list[Layer]:
    """The layers ``patterns`` match (whole name, a parent's name, or the node name); a pattern matching no layer
    is a ``ConfigError`` naming near names."""
    hit: list[Layer] = []
    for pat in compile_patterns(patterns, option):
        mine = [la for la in all_layers if pat.fullmatch(la.node) or any(pat.fullmatch(a) for a in _ancestors(
            la.name))]
        if not mine:
            near = [la.name for la in all_layers if re.search(pat.pattern, la.name)][:5]
            names = near or [la.name for la in all_layers][:8]
            raise ConfigError(f"{option}: regex {pat.pattern!r} matches no quantizable layer (it must match a whole "
                              f"name or a parent's); layers: {', '.join(names)}{' ...' if not near else ''}")
        hit += [la for la in mine if la not in hit]
    return hit


# ----------------------------------------------------------------------------------------------- calibration
def calibration_feeds(calib_data: Iterable | torch.Tensor, input_names: list[str], batches: int,
                      what: str = "calib_data") -> list[Feeds]:
    """The first ``batches`` batches of ``calib_data`` as ONNX feeds (input name -> array); labels dropped."""
    if calib_data is None:
        raise ConfigError(f"{what} is required: an iterable of batches (tensors, (inputs, labels) pairs or dicts) "
                          "the activation ranges are calibrated on")
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    feeds = []
    for batch in calib_data:
        if len(feeds) >= batches:
            break
        feeds.append(to_feeds(batch, input_names, what))
    if not feeds:
        raise ConfigError(f"{what} gave no batch: calibration needs at least one")
    return feeds


def to_feeds(batch: Any, input_names: list[str], what: str = "batch") -> Feeds:
    """One batch as ONNX feeds, in the order of the model's inputs."""
    try:
        inputs, _ = split_batch(batch)
        _, tensors = flatten_inputs(inputs)
    except PrunekitError as e:
        raise ConfigError(f"{what}: {e}") from None
    if len(tensors) != len(input_names):
        raise ConfigError(f"{what}: a batch holds {len(tensors)} input(s), the model takes {len(input_names)} "
                          f"({', '.join(input_names)})")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(input_names, tensors)}


def samples(feeds: list[Feeds]) -> int:
    return sum(int(next(iter(f.values())).shape[0]) for f in feeds)
