"""ONNX export (dynamic batch axis, opset option) and the ONNX Runtime runner used by verification and latency.

What torch 2.14's ``torch.onnx.export`` does by default: ``dynamo=True``, i.e. the torch.export-based exporter
(needs ``onnxscript``); its lowest opset is 18 (asking for less *silently* yields opset 18 after a failed
down-conversion) and it writes the weights to a side file ``<name>.onnx.data`` (``external_data=True``). So here:

- ``auto`` (default): ``torch.export.export`` then the dynamo exporter, for opset >= 18; if torch.export or the
  conversion fails, or an opset < 18 is asked for, the TorchScript-based exporter (``dynamo=False``, deprecated but
  still there) is tried, and the log says which one wrote the file.
- The weights go inside the ``.onnx`` file unless the model is over 1.8 GB (protobuf's 2 GB limit).
- An operator with no ONNX conversion is named together with the module that calls it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, ExportError
from prunekit.export.core import (
    ExportFormat,
    ExportOptions,
    dynamic_axes,
    module_of,
    register_format,
    save_atomic,
    settle,
    torch_export,
)

log = logging.getLogger(__name__)

DYNAMO_MIN_OPSET = 18
EXTERNAL_DATA_BYTES = int(1.8 * 2**30)
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes",
                  "onnx_ir")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings and INFO chatter (their errors still raise)."""
    levels = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        levels[name] = lg.level
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# ----------------------------------------------------------------------------------------------- export
def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
                path: Path, options: ExportOptions, prefix: str = "") -> dict[str, Any]:
    """Write ``module(*args)`` to ``path`` as ONNX; returns what the manifest records (exporter, opset, axes).

    Example:
        >>> export_onnx(model, (torch.randn(2, 3, 32, 32),), ["input"], ["output"], Path("m.onnx"), ExportOptions())
    """
    if options.onnx_exporter not in ("auto", "dynamo", "torchscript"):
        raise ConfigError(f"--onnx-exporter {options.onnx_exporter!r} is invalid; valid: auto, dynamo, torchscript")
    if options.onnx_exporter == "dynamo" and options.opset < DYNAMO_MIN_OPSET:
        raise ConfigError(f"--opset {options.opset}: the dynamo ONNX exporter writes opset {DYNAMO_MIN_OPSET} or "
                          f"newer; use --onnx-exporter torchscript (or auto) for older opsets")
    axes = dynamic_axes(args, options.dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    diagnosis = ""
    if options.onnx_exporter in ("auto", "dynamo") and options.opset >= DYNAMO_MIN_OPSET:
        try:
            _export_dynamo(module, args, input_names, output_names, path, options.opset, axes)
            return _info("dynamo", path, input_names, output_names, axes)
        except ExportError:
            raise
        except Exception as e:
            diagnosis = diagnose(e, module, args, axes, prefix)
            errors.append(f"dynamo exporter: {diagnosis or _first_line(e)}")
            if options.onnx_exporter == "dynamo":
                raise ExportError(f"onnx: {errors[0]}") from e
            log.warning("onnx: the torch.export-based exporter failed (%s); trying the TorchScript-based one",
                        diagnosis or _first_line(e))
            settle(module, args)  # the trace's symbolic sizes out of the module's caches
    try:
        _export_legacy(module, args, input_names, output_names, path, options.opset, axes)
    except Exception as e:
        legacy = diagnose(e, module, args, axes, prefix)
        if legacy and legacy == diagnosis:  # both exporters stumble on the same operator: say it once
            raise ExportError(f"onnx: export failed: {diagnosis}") from e
        errors.append(f"TorchScript-based exporter: {legacy or _first_line(e)}")
        raise ExportError("onnx: export failed. " + "; ".join(errors)) from e
    return _info("torchscript", path, input_names, output_names, axes)


def _info(exporter: str, path: Path, input_names: list[str], output_names: list[str],
          axes: list[dict[int, str]]) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    files = [path.name] + ([path.name + ".data"] if (path.parent / (path.name + ".data")).is_file() else [])
    return {"exporter": exporter, "opset": opset, "input_names": input_names, "output_names": output_names,
            "dynamic_axes": {n: {str(k): v for k, v in a.items()} for n, a in zip(input_names, axes)},
            "files": files}


def _export_dynamo(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], path: Path, opset: int, axes: list[dict[int, str]]) -> None:
    with quiet():
        ep = torch_export(module, args, axes)
        program = torch.onnx.export(ep, args, None, input_names=input_names, output_names=output_names,
                                    opset_version=opset, dynamo=True, verbose=False, optimize=True)
        # from an ExportedProgram the axes are named after torch's symbols (s77); give them our names
        rename = {}
        for value, a in zip(program.model.graph.inputs, axes):
            for axis, name in a.items():
                symbol = getattr(value.shape[axis], "value", None) if value.shape is not None else None
                if isinstance(symbol, str) and symbol != name:
                    rename[symbol] = name
        if rename:
            program.rename_axes(rename)
        external = _param_bytes(module) > EXTERNAL_DATA_BYTES

        def write(tmp: Path) -> None:
            program.save(str(tmp), external_data=external)
            _check(tmp)

        save_atomic(path, write)


def _export_legacy(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], path: Path, opset: int, axes: list[dict[int, str]]) -> None:
    dyn = {n: a for n, a in zip(input_names, axes) if a}
    out_axes = {0: "batch"} if any(0 in a for a in axes) else {}
    for n in output_names:
        if out_axes:
            dyn[n] = dict(out_axes)

    def write(tmp: Path) -> None:
        torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dyn or None, opset_version=opset,
                          do_constant_folding=True)
        _check(tmp)

    with quiet():
        save_atomic(path, write)


def _check(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))


# ----------------------------------------------------------------------------------------------- diagnosis
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"operator '?(\w+::\w+)'?"),
    re.compile(r"namespace (\w+::\w+)"),
    re.compile(r"'(\w+::\w+)'"),
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # the dynamo exporter's messages start with generic advice; the useful part follows "Exception summary"
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line[:300]}"


def _messages(e: BaseException) -> str:
    parts, seen = [], 0
    while e is not None and seen < 10:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
        seen += 1
    return "\n".join(parts)


def find_op(text: str) -> str | None:
    """The operator an exporter error names (``pktest::weird`` / ``aten.foo.default`` -> ``pktest.weird``)."""
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            op = m.group(1).replace("::", ".")
            parts = op.split(".")
            if len(parts) >= 3:  # namespace.name.overload
                op = ".".join(parts[:2])
            return op
    return None


def op_modules(module: nn.Module, args: tuple[torch.Tensor, ...], op: str, axes: list[dict[int, str]],
               prefix: str = "") -> list[str]:
    """Module paths whose forward calls ``op`` (``namespace.name``), from ``torch.export``'s module stacks."""
    try:
        with quiet():
            ep = torch_export(module, args, axes)
    except Exception:
        return []
    found: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(op + "."):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if path.startswith(prefix):
            path = path[len(prefix):]
        if path not in found:
            found.append(path)
    return found


def diagnose(e: BaseException, module: nn.Module, args: tuple[torch.Tensor, ...], axes: list[dict[int, str]],
             prefix: str = "") -> str:
    """'operator pktest.weird (called in block.1 (Weird)) has no ONNX conversion' when an op is to blame, else ''."""
    text = _messages(e)
    if "No ONNX function found" not in text and "Unsupported" not in text and "unsupported" not in text \
            and "not supported" not in text and "unrecognized namespace" not in text:
        return ""
    op = find_op(text)
    if op is None:
        return ""
    root = module.model if prefix and hasattr(module, "model") else module
    where = [module_of(root, p) for p in op_modules(module, args, op, axes, prefix)]
    loc = f" (called in {', '.join(where)})" if where else ""
    return (f"operator {op}{loc} has no ONNX conversion; replace that module, register a conversion with "
            f"torch.onnx.export(custom_translation_table=...), or use another --format (exported, torchscript)")


# ----------------------------------------------------------------------------------------------- ONNX Runtime
def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations; ``threads`` intra-op threads (None: ORT default).

    With ``OMP_WAIT_POLICY=PASSIVE`` in the environment (set it on a shared, busy machine: spinning threads that
    wait for a descheduled peer make multi-threaded runs up to 10x slower), ORT's threads do not spin either.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("onnxruntime is not installed: pip install 'prunekit[export]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {str(path)!r}: {_first_line(e)}") from None


class OnnxRunner:
    """``runner(*tensors) -> list[Tensor]`` over an ONNX Runtime session (inputs in the session's order)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = ort_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feeds(self, *args: torch.Tensor) -> dict[str, Any]:
        if len(args) != len(self.input_names):
            raise ExportError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                              f"got {len(args)}")
        return {n: a.detach().cpu().contiguous().numpy() for n, a in zip(self.input_names, args)}

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in self.session.run(None, self.feeds(*args))]


ONNX = register_format(ExportFormat(
    name="onnx", filename="model.onnx", export=export_onnx, load=OnnxRunner,
    description="ONNX (dynamic batch axis), run with ONNX Runtime"))
