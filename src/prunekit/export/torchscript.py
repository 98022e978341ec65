"""TorchScript export: ``torch.jit.trace`` (scripting fails on most real models), saved with ``torch.jit.save``.

TorchScript is deprecated from torch 2.9 on (its warnings are silenced here) but still the format many C++ and
mobile runtimes load. Tracing records one path through ``forward``: verification on another batch size
(``--verify``) catches a batch size or a branch baked into the trace.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ExportError
from prunekit.export.core import ExportFormat, ExportOptions, as_tensors, register_format, save_atomic


def export_torchscript(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                       output_names: list[str], path: Path, options: ExportOptions, prefix: str = "") -> dict[str, Any]:
    """Trace ``module(*args)`` and save it to ``path``; returns what the manifest records."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, args, check_trace=False, strict=False)
        except Exception as e:
            line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ExportError(f"torchscript: torch.jit.trace failed: {type(e).__name__}: {line}") from e
        save_atomic(path, lambda tmp: torch.jit.save(traced, str(tmp)))
    return {"input_names": input_names, "output_names": output_names, "files": [Path(path).name],
            "dynamic_axes": "traced (batch verified by --verify)"}


def load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ExportError(f"torchscript: cannot load {str(path)!r}: {type(e).__name__}: {e}") from None
    module.eval()

    @torch.no_grad()
    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return as_tensors(module(*args))

    return run


TORCHSCRIPT = register_format(ExportFormat(
    name="torchscript", filename="model.torchscript.pt", export=export_torchscript, load=load_torchscript,
    description="TorchScript (torch.jit.trace), load with torch.jit.load"))
