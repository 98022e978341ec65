"""Export a model to several formats with verification (``export_model``), and the verification inputs of a run
directory. The ``prunekit export`` stage over run directories is ``prunekit.pipeline.export``.

Where the stage puts the files:

- default: into the source run directory's ``export/`` folder (the run's own files are not touched)::

      runs/pruned/export/model.onnx  model.torchscript.pt  model.pt2  export.json  log.txt

- ``--out DIR``: a new run directory holding a copy of the source's model files, config, metrics and log
  (``metrics.json`` gains ``exported_from``), with the exports in ``DIR/export/``.

``export.json`` records per format the file(s), input/output names (inputs are positional, in that order), dynamic
axes, the ONNX exporter and opset actually used, the file size, and the verification result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.errors import ExportError
from prunekit.export.core import (
    FORMATS,
    ExportOptions,
    Verification,
    as_tensors,
    output_names,
    positional,
    shared_exports,
    verify_file,
)

log = logging.getLogger(__name__)
MANIFEST = "export.json"
EXPORT_DIR = "export"


# ----------------------------------------------------------------------------------------------- model level
def export_model(model: nn.Module, example_inputs: Any, out_dir: str | Path, formats: list[str] | tuple[str, ...] = (
        "onnx",), options: ExportOptions | None = None, verify_inputs: Any = None, atol: float = 1e-4,
        rtol: float = 1e-4, inputs_desc: str = "example inputs") -> dict[str, Any]:
    """Export ``model`` to ``out_dir`` in each format, verify each on ``verify_inputs`` when given, and write
    ``out_dir/export.json``. Returns the manifest; a failed verification is recorded (``ok: false``), not raised
    (see :func:`check_verified`).

    Example:
        >>> m = export_model(model, torch.randn(2, 3, 32, 32), "out", ["onnx", "exported"],
        ...                  verify_inputs=torch.randn(3, 3, 32, 32))
        >>> m["formats"]["onnx"]["verify"]["max_abs_diff"]
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmts = [FORMATS.get(f) for f in formats]
    was_training = model.training
    model.eval()
    try:
        module, names, args, prefix = positional(model, example_inputs)
        with torch.no_grad():
            outs = output_names(len(as_tensors(module(*args))))
        manifest = _read_manifest(out_dir)
        with shared_exports():  # ONNX (dynamo) and .pt2 share one torch.export of the model
            for fmt in fmts:
                path = out_dir / fmt.filename
                if path.exists():
                    log.info("export: replacing %s", path)
                info = fmt.export(module, args, names, outs, path, options, prefix)
                size = sum((out_dir / f).stat().st_size for f in info.get("files", []))
                info = {"file": fmt.filename, "bytes": size, **info}
                extra = f", {info['exporter']} exporter, opset {info['opset']}" if "opset" in info else ""
                log.info("export: %s: wrote %s (%.2f MB%s)", fmt.name, path, size / 1e6, extra)
                if verify_inputs is not None:
                    v = verify_file(fmt.name, path, model, verify_inputs, atol, rtol, inputs_desc)
                    info["verify"] = v.to_dict()
                    (log.info if v.ok else log.error)("verify: %s", v.summary())
                manifest["formats"][fmt.name] = info
        manifest["torch"] = torch.__version__
        atomic_write_json(out_dir / MANIFEST, manifest)
    finally:
        model.train(was_training)
    return manifest


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    import json

    p = out_dir / MANIFEST
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            if isinstance(data.get("formats"), dict):
                return data
        except json.JSONDecodeError:
            log.warning("export: %s is corrupt; starting a new one", p)
    return {"formats": {}}


def check_verified(manifest: dict[str, Any], formats: list[str] | tuple[str, ...] | None = None) -> None:
    """Raise ``ExportError`` with the differences when any verified format (of ``formats``: default all) failed."""
    failed = [Verification(**info["verify"]) for name, info in manifest["formats"].items()
              if (formats is None or name in formats) and "verify" in info and not info["verify"]["ok"]]
    if failed:
        raise ExportError("--verify failed: the export differs from torch: " + "; ".join(v.summary() for v in failed))


# ----------------------------------------------------------------------------------------------- run dir level
def verification_inputs(run_dir: str | Path, spec: runs.ModelSpec, batch_size: int) -> tuple[Any, str]:
    """Real inputs for ``--verify``: a validation batch of the run's dataset when it loads offline, else the
    spec's example inputs (text: random tokens with padding masked out on every second row)."""
    if spec.input.get("kind", "image") == "text":
        inputs = runs.example_inputs(spec, batch_size, seed=1)
        mask = inputs["attention_mask"]
        mask[1::2, mask.shape[1] // 2:] = 0  # exercise the padding path of attention
        return inputs, "random tokens, half the rows padded"
    cfg = runs.read_config(run_dir)
    name = cfg.get("dataset")
    want = list(spec.input.get("shape", []))[1:]
    if name:
        try:
            from prunekit.data import get_dataset

            ds = get_dataset(name, "val", data_dir=cfg.get("data_dir"), image_size=cfg.get("image_size"))
            x = torch.stack([ds[i][0] for i in range(min(batch_size, len(ds)))])
            if list(x.shape[1:]) == want and len(x) == batch_size:
                return x, f"{name} val images"
            log.info("verify: %s images have shape %s, the model expects %s; using random inputs",
                     name, list(x.shape[1:]), want)
        except Exception as e:  # no data on this machine: random inputs still verify the numerics
            log.info("verify: %s is not available (%s); using random inputs", name, e)
    return runs.example_inputs(spec, batch_size, seed=1), "random inputs"
