"""``torch.export`` export: an ``ExportedProgram`` saved as ``.pt2`` (dynamic batch axis), reloaded with
``torch.export.load(path).module()``. The format torch's own compilers (AOTInductor, ExecuTorch) start from."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ExportError
from prunekit.export.core import (
    ExportFormat,
    ExportOptions,
    as_tensors,
    dynamic_axes,
    register_format,
    save_atomic,
    torch_export,
)


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
