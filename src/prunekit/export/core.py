"""What every export format shares: positional inputs, the format registry, dynamic axes, and output comparison.

Exported artifacts take their inputs *positionally*, in the order of ``input_names`` (recorded in
``export/export.json``): ``input`` for an image model, ``input_ids, attention_mask`` for a text model. A model whose
forward takes keyword tensors (Hugging Face) is wrapped in :class:`PositionalAdapter` first; this also sidesteps a
torch 2.14 ``torch.export`` bug with ``**kwargs`` forwards (guards that name ``L['inputs']``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ExportError
from prunekit.registry import Registry

log = logging.getLogger(__name__)

# the batch used to trace/export: 2, not 1, so that exporters cannot specialise the batch axis to a constant
EXPORT_BATCH = 2


# ----------------------------------------------------------------------------------------------- inputs
def flatten_inputs(example_inputs: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """``(input_names, tensors)`` of a tensor, a tuple/list of tensors, or a dict of keyword tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return ["input"], (example_inputs,)
    if isinstance(example_inputs, dict):
        names, values = list(example_inputs), tuple(example_inputs.values())
    elif isinstance(example_inputs, (tuple, list)):
        names, values = [f"input_{i}" for i in range(len(example_inputs))], tuple(example_inputs)
    else:
        raise ExportError(f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                          f"got {type(example_inputs).__name__}")
    bad = [n for n, v in zip(names, values) if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(f"example input {bad[0]!r} is not a tensor; exports take tensors only")
    return names, values


class PositionalAdapter(nn.Module):
    """Calls ``model(**dict(zip(names, args)))``: a keyword-input model with a positional ``forward``."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args)))


def positional(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, list[str], tuple[torch.Tensor, ...], str]:
    """``(module, input_names, args, prefix)``: the module to export, called as ``module(*args)``.

    ``prefix`` is what the adapter adds to module names (``"model."``), so error messages can strip it.
    """
    names, args = flatten_inputs(example_inputs)
    if isinstance(example_inputs, dict):
        return PositionalAdapter(model, names).eval(), names, args, "model."
    return model, names, args, ""


def as_tensors(output: Any) -> list[torch.Tensor]:
    """A model output as a flat list of tensors (a tensor, a tuple/list, or a dict / ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    raise ExportError(f"the model returns {type(output).__name__}; exports need a tensor or a tuple of tensors")


def output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def is_sequence_input(t: torch.Tensor) -> bool:
    """Token inputs ``(B, T)`` of integer dtype get a dynamic ``sequence`` axis besides the batch axis."""
    return t.dim() == 2 and not t.is_floating_point()


def dynamic_axes(args: Sequence[torch.Tensor], dynamic_batch: bool) -> list[dict[int, str]]:
    """Per input, ``{axis: name}`` of its dynamic axes (``batch`` = 0, ``sequence`` = 1 for token inputs)."""
    out = []
    for t in args:
        axes: dict[int, str] = {0: "batch"} if dynamic_batch else {}
        if is_sequence_input(t):
            axes[1] = "sequence"
        out.append(axes)
    return out


def _sequence_max(module: nn.Module) -> int | None:
    """The longest sequence a text model takes (Hugging Face ``max_position_embeddings``), if it says."""
    inner = module.model if isinstance(module, PositionalAdapter) else module
    n = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 1 else None


def export_dims(axes: list[dict[int, str]], module: nn.Module) -> Any:
    """``torch.export`` dynamic shapes for ``dynamic_axes(...)`` (one shared ``Dim`` per axis name), or None.

    They follow ``forward``'s signature: one entry per named positional parameter, then the rest nested for a
    ``*args`` (the adapter's ``forward(*args)``: ``((dims of arg 0, dims of arg 1, ...),)``; Ultralytics'
    ``forward(x, *args, **kwargs)`` called with one input: ``(dims of x,)``).
    """
    from torch.export import Dim

    if not any(axes):
        return None
    seq_max = _sequence_max(module)
    dims: dict[str, Any] = {}
    for a in axes:
        for name in a.values():
            if name not in dims:
                dims[name] = Dim(name, min=1, max=seq_max) if name == "sequence" and seq_max else Dim(name, min=1)
    shapes = tuple({i: dims[n] for i, n in a.items()} for a in axes)
    params = list(inspect.signature(module.forward).parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return shapes
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return shapes if len(shapes) <= named else (*shapes[:named], shapes[named:])


# one torch.export per (module, input shapes, axes) inside `shared_exports`: ONNX and .pt2 share it
_EP_CACHE: dict[tuple, Any] | None = None


@contextlib.contextmanager
def shared_exports() -> Iterator[None]:
    """Within the block, :func:`torch_export` of the same module, input shapes and axes runs once."""
    global _EP_CACHE
    old, _EP_CACHE = _EP_CACHE, {}
    try:
        yield
    finally:
        _EP_CACHE = old


def settle(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """One eager call on real inputs, for modules that cache shape-dependent values in ``forward`` (Ultralytics'
    ``Detect``: its anchors and the input shape it made them for). Before a trace, a cached batch equal to the traced
    one would be read as a constant (torch.export then fixes the batch axis); after a torch.export trace, the cache
    holds symbolic sizes, on which the TorchScript-based exporter fails (``Unsupported value kind: SymInt``)."""
    with contextlib.suppress(Exception), torch.no_grad():
        module(*args)


def torch_export(module: nn.Module, args: tuple[torch.Tensor, ...], axes: list[dict[int, str]]) -> Any:
    """``torch.export.export(module, args)`` with ``axes`` dynamic. When torch.export suggests tighter ranges
    (``sequence <= 512``) they are applied and the export retried once; a batch axis it would fix is an error."""
    # torch.export specialises a size-1 dimension to 1: a dynamic batch is traced on a batch of 2 (the example
    # repeated), so the batch-1 example a user prunes with also exports with a dynamic batch
    args = tuple(a.expand(2, *a.shape[1:]).clone() if ax.get(0) == "batch" and a.dim() and a.shape[0] == 1 else a
                 for a, ax in zip(args, axes))
    key = (id(module), tuple((tuple(a.shape), a.dtype) for a in args), repr(axes))
    if _EP_CACHE is not None and key in _EP_CACHE:
        return _EP_CACHE[key]
    if any(ax.get(0) == "batch" for ax in axes):  # cached sizes of an earlier call must not equal the traced batch
        settle(module, tuple(a[:1] if ax.get(0) == "batch" else a for a, ax in zip(args, axes)))
    shapes = export_dims(axes, module)
    try:
        ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        msg = getattr(e, "msg", None)
        if shapes is None or not isinstance(msg, str) or "Suggested fixes:" not in msg:
            raise
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        fixes = [f.strip() for f in msg.split("Suggested fixes:", 1)[1].strip().splitlines() if f.strip()]
        if any(re.match(r"batch = \d+$", f) for f in fixes):
            raise ExportError(f"the model fixes the batch axis to its example size ({'; '.join(fixes)}); "
                              "export with a fixed batch: --no-dynamic-batch (Python: dynamic_batch=False)") from None
        log.info("torch.export: applying its suggested dynamic-shape fixes: %s", "; ".join(fixes))
        shapes = refine_dynamic_shapes_from_suggested_fixes(msg, shapes)
        ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    if _EP_CACHE is not None:
        _EP_CACHE[key] = ep
    return ep


def save_atomic(path: str | Path, write: Callable[[Path], None]) -> list[str]:
    """Call ``write(tmp_folder / path.name)`` then move every file it wrote beside ``path``; returns their names.

    The temporary file keeps the final name (exporters check suffixes; ONNX external data refers to it by name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        write(Path(tmp) / path.name)
        names = sorted(f.name for f in Path(tmp).iterdir())
        for name in names:
            os.replace(Path(tmp) / name, path.parent / name)
    return names


# ----------------------------------------------------------------------------------------------- formats
@dataclass
class ExportOptions:
    """Options of one export: ``opset`` and ``onnx_exporter`` concern ONNX only."""

    opset: int = 18
    dynamic_batch: bool = True
    onnx_exporter: str = "auto"  # auto (torch.export-based, falling back to TorchScript-based), dynamo, torchscript


@dataclass
class ExportFormat:
    """One export format: how to write a file, and how to load it back as ``runner(*tensors) -> list[Tensor]``."""

    name: str
    filename: str
    export: Callable[[nn.Module, tuple[torch.Tensor, ...], list[str], list[str], Path, ExportOptions, str],
                     dict[str, Any]]
    load: Callable[[Path], Callable[..., list[torch.Tensor]]]
    description: str


FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(fmt: ExportFormat) -> ExportFormat:
    FORMATS.register(fmt.name)(fmt)
    return fmt


# ----------------------------------------------------------------------------------------------- verification
@dataclass
class Verification:
    """The exported model against torch on the same inputs: ``ok`` when every ``|got - ref| <= atol + rtol*|ref|``."""

    format: str
    ok: bool
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    batch_size: int
    inputs: str = "example inputs"
    problem: str = ""
    shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        tol = f"atol {self.atol:g}" + (f" + rtol {self.rtol:g}" if self.rtol else "")
        verdict = "OK" if self.ok else "FAILED"
        extra = f" ({self.problem})" if self.problem else ""
        return (f"{self.format}: {verdict}: max abs diff {self.max_abs_diff:.3g}, max rel diff "
                f"{self.max_rel_diff:.3g} ({tol}; batch {self.batch_size}, {self.inputs}){extra}")


def compare_outputs(ref: list[torch.Tensor], got: list[torch.Tensor], atol: float, rtol: float
                    ) -> tuple[bool, float, float, str]:
    """``(ok, max_abs_diff, max_rel_diff, problem)`` of two lists of outputs."""
    if len(ref) != len(got):
        return False, math.inf, math.inf, f"{len(got)} outputs, torch gives {len(ref)}"
    max_abs = max_rel = 0.0
    ok, problem = True, ""
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = r.detach().cpu(), torch.as_tensor(g).detach().cpu()
        if tuple(r.shape) != tuple(g.shape):
            return False, math.inf, math.inf, f"output {i} has shape {tuple(g.shape)}, torch gives {tuple(r.shape)}"
        if r.is_floating_point() or g.is_floating_point():
            r64, g64 = r.double(), g.double()
        else:
            r64, g64 = r.long().double(), g.long().double()
        if r64.numel() == 0:
            continue
        diff = (g64 - r64).abs()
        if not torch.isfinite(g64).all() and not torch.equal(torch.isfinite(g64), torch.isfinite(r64)):
            return False, math.inf, math.inf, f"output {i} has non-finite values where torch has none"
        diff = torch.nan_to_num(diff, nan=0.0, posinf=0.0)
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / r64.abs().clamp_min(1e-12)).max()))
        if not bool((diff <= atol + rtol * r64.abs()).all()):
            ok = False
    return ok, max_abs, max_rel, problem


@torch.no_grad()
def verify_runner(fmt: str, runner: Callable[..., list[torch.Tensor]], model: nn.Module, example_inputs: Any,
                  atol: float = 1e-4, rtol: float = 1e-4, inputs_desc: str = "example inputs") -> Verification:
    """Run ``runner`` (a loaded export) and ``model`` on ``example_inputs`` and compare the outputs."""
    from prunekit.batch import batch_size_of, call_model

    was_training = model.training
    model.eval()
    try:
        ref = as_tensors(call_model(model, example_inputs))
    finally:
        model.train(was_training)
    _, args = flatten_inputs(example_inputs)
    try:
        got = runner(*args)
    except Exception as e:  # the artifact does not run on these inputs: a failed verification, not a crash
        return Verification(fmt, False, math.inf, math.inf, atol, rtol, batch_size_of(example_inputs), inputs_desc,
                            problem=f"running the export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    ok, max_abs, max_rel, problem = compare_outputs(ref, got, atol, rtol)
    return Verification(fmt, ok, max_abs, max_rel, atol, rtol, batch_size_of(example_inputs), inputs_desc, problem,
                        shapes=[list(t.shape) for t in ref])


def verify_file(fmt: str, path: str | Path, model: nn.Module, example_inputs: Any, atol: float = 1e-4,
                rtol: float = 1e-4, inputs_desc: str = "example inputs") -> Verification:
    """Load an exported file of format ``fmt`` and compare it with ``model`` on ``example_inputs``.

    Example:
        >>> v = verify_file("onnx", "runs/pruned/export/model.onnx", model, torch.randn(3, 1, 16, 16))
        >>> v.ok, v.max_abs_diff
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{fmt}: file {str(path)!r} does not exist")
    runner = FORMATS.get(fmt).load(path)
    return verify_runner(fmt, runner, model, example_inputs, atol, rtol, inputs_desc)


def module_of(model: nn.Module, name: str) -> str:
    """``"name (ClassName)"`` for a module path, or just the path when it does not resolve."""
    try:
        return f"{name} ({type(model.get_submodule(name)).__name__})" if name else f"<root> ({type(model).__name__})"
    except AttributeError:
        return name
