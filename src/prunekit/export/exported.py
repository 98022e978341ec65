"""``torch.export`` export: an ``ExportedProgram`` saved as ``.pt2`` (dynamic batch axis), reloaded with
``torch.export.load(path).module()``. The format torch's own compilers (AOTInductor, ExecuTorch) start from.

``save_exported(folder, model, example_inputs)`` writes the same program as a self-contained model folder
(``model.pt2`` + ``model.json``) that ``prunekit.load_model`` reloads without the model's Python class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit._io import atomic_write_json
from prunekit.errors import ExportError
from prunekit.export.core import (
    ExportFormat,
    ExportOptions,
    as_tensors,
    dynamic_axes,
    positional,
    register_format,
    save_atomic,
    torch_export,
)
from prunekit.runs_spec import PROGRAM, SPEC, ModelSpec, input_spec_of


def export_program(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str], path: Path, options: ExportOptions, prefix: str = "") -> dict[str, Any]:
    """``torch.export.export(module, args)`` with a dynamic batch axis, saved to ``path`` (``.pt2``)."""
    axes = dynamic_axes(args, options.dynamic_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch_export(module, args, axes)
        except Exception as e:
            text = str(e).strip()
            line = text.splitlines()[0][:400] if text else ""
            hint = (" (the model fixes a dynamic axis to its example size; try --no-dynamic-batch)"
                    if "specializ" in text or "Constraints violated" in text else "")
            raise ExportError(f"exported: torch.export.export failed: {type(e).__name__}: {line}{hint}") from e
        save_atomic(path, lambda tmp: torch.export.save(ep, str(tmp)))
    return {"input_names": input_names, "output_names": output_names, "files": [Path(path).name],
            "dynamic_axes": {n: {str(k): v for k, v in a.items()} for n, a in zip(input_names, axes)}}


def load_program(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.export.load(str(path)).module()
        except Exception as e:
            raise ExportError(f"exported: cannot load {str(path)!r}: {type(e).__name__}: {e}") from None

    @torch.no_grad()
    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return as_tensors(module(*args))

    return run


EXPORTED = register_format(ExportFormat(
    name="exported", filename="model.pt2", export=export_program, load=load_program,
    description="torch.export ExportedProgram (.pt2), load with torch.export.load(path).module()"))


def save_exported(path: str | Path, model: nn.Module, example_inputs: Any, dynamic_batch: bool = True) -> ModelSpec:
    """Save ``model`` as a self-contained ``torch.export`` program: ``path/model.pt2`` + ``path/model.json``.

    ``prunekit.load_model(path)`` returns the program's module: it runs without the model's Python class (inputs
    are positional: a tensor, or the values of a dict input in order). It cannot be pruned or trained further; keep
    a ``save_model`` folder for that.

    Example:
        >>> prunekit.save_exported("out", pruned, torch.randn(1, 3, 32, 32))
        >>> prunekit.load_model("out")(torch.randn(4, 3, 32, 32))
    """
    module, names, args, _ = positional(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        options = ExportOptions(dynamic_batch=dynamic_batch)
        export_program(module, args, names, ["output"], Path(path) / PROGRAM, options)
    finally:
        model.train(was_training)
    attached = getattr(model, "prunekit_spec", None)
    spec = ModelSpec(input=input_spec_of(example_inputs) or (dict(attached.input) if attached else {}), program=PROGRAM)
    atomic_write_json(Path(path) / SPEC, spec.to_dict())
    return spec
