"""Export a model to several formats with verification, and the ``prunekit export`` stage over run directories.

Where the files go:

- default: into the source run directory's ``export/`` folder (the run's own files are not touched)::

      runs/pruned/export/model.onnx  model.torchscript.pt  model.pt2  export.json  log.txt

- ``--out DIR``: a new run directory holding a copy of the source's model files, config, metrics and log
  (``metrics.json`` gains ``exported_from``), with the exports in ``DIR/export/``.

``export.json`` records per format the file(s), input/output names (inputs are positional, in that order), dynamic
axes, the ONNX exporter and opset actually used, the file size, and the verification result.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config
from prunekit.errors import ConfigError, ExportError
from prunekit.export.core import (
    EXPORT_BATCH,
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


class ExportConfig(Config):
    """``prunekit export``: write a run directory's model as ONNX / TorchScript / torch.export, optionally verified."""

    from_dir: Path = Field(alias="from", description="run directory of the model to export")
    format: list[str] = Field(["onnx"], description="formats, comma-separated: onnx, torchscript, exported "
                                                     "(torch.export .pt2)")
    out: Path | None = Field(None, description="write a new run directory here (copy of the model files, config, "
                                               "metrics, log + export/); default: add export/ to --from")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    opset: int = Field(18, ge=7, description="ONNX opset (the torch.export-based exporter needs >= 18; lower opsets "
                                             "use the TorchScript-based exporter)")
    onnx_exporter: str = Field("auto", description="ONNX exporter: auto (torch.export-based, falling back to the "
                                                   "TorchScript-based one), dynamo, torchscript")
    dynamic_batch: bool = Field(True, description="make the batch axis dynamic (text models also get a dynamic "
                                                  "sequence axis)")
    verify: bool = Field(False, description="run each export on real inputs and compare with torch; exit non-zero "
                                            "if the max abs diff exceeds --atol")
    atol: float = Field(1e-4, gt=0, description="--verify: absolute tolerance")
    rtol: float = Field(0.0, ge=0, description="--verify: relative tolerance added to --atol (|diff| <= atol + "
                                               "rtol*|torch|)")
    verify_batch_size: int = Field(3, gt=0, description="--verify: batch size (differs from the export batch of "
                                                        f"{EXPORT_BATCH} to test the dynamic batch axis)")
    batch_size: int = Field(1, gt=0, description="with --no-dynamic-batch: the fixed batch size of the exported "
                                                 "model (also used by --verify)")

    @field_validator("format")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one format; valid: {', '.join(FORMATS.names())}")
        for name in v:
            FORMATS.get(name)  # ConfigError listing the valid formats
        return list(dict.fromkeys(v))

    @field_validator("onnx_exporter")
    @classmethod
    def _known_exporter(cls, v: str) -> str:
        if v not in ("auto", "dynamo", "torchscript"):
            raise ValueError(f"unknown ONNX exporter {v!r}; valid: auto, dynamo, torchscript")
        return v


# ----------------------------------------------------------------------------------------------- model level
def export_model(model: nn.Module, example_inputs: Any, out_dir: str | Path, formats: list[str] | tuple[str, ...] = (
        "onnx",), options: ExportOptions | None = None, verify_inputs: Any = None, atol: float = 1e-4,
        rtol: float = 0.0, inputs_desc: str = "example inputs") -> dict[str, Any]:
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


def _copy_run(src: Path, out: Path) -> None:
    for f in sorted(runs.RUN_FILES | {runs.HISTORY}):
        if (src / f).is_file() and f != runs.METRICS:
            shutil.copy2(src / f, out / f)
    metrics = runs.read_metrics(src) if (src / runs.METRICS).is_file() else {}  # save_model writes none
    runs.write_metrics(out, {**metrics, "exported_from": str(src)})


def export_run(cfg: ExportConfig) -> dict[str, Any]:
    """Export the model of ``cfg.from_dir`` (see the module docstring for where the files go).

    Raises ``ExportError`` naming the differences when ``cfg.verify`` and an export differs from torch.

    Example:
        >>> export_run(ExportConfig.build({"from": "runs/pruned", "format": ["onnx"], "verify": True}))
    """
    src = runs.check_model_dir(cfg.from_dir)  # a run directory, or a folder of prunekit.save_model
    if cfg.out is not None:
        if Path(cfg.out).resolve() == src.resolve():
            raise ConfigError(f"--out {str(cfg.out)!r} is the same folder as --from; leave --out out to export "
                              f"into {str(src / EXPORT_DIR)!r}")
        run_dir = runs.prepare_out_dir(cfg.out, overwrite=cfg.overwrite, resumable=False)
        _copy_run(src, run_dir)
        log_dir = run_dir
    else:
        run_dir = src
        log_dir = src / EXPORT_DIR
    export_dir = run_dir / EXPORT_DIR
    with runs.run_log(log_dir):
        model = runs.load_model(src)
        spec = model.prunekit_spec
        log.info("export: %s from %s -> %s (%s)", spec.name, src, export_dir, ", ".join(cfg.format))
        export_batch, verify_batch = ((EXPORT_BATCH, cfg.verify_batch_size) if cfg.dynamic_batch
                                      else (cfg.batch_size, cfg.batch_size))
        verify_inputs, desc = verification_inputs(src, spec, verify_batch) if cfg.verify else (None, "")
        options = ExportOptions(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch, onnx_exporter=cfg.onnx_exporter)
        manifest = export_model(model, runs.example_inputs(spec, export_batch), export_dir, cfg.format, options,
                                verify_inputs, cfg.atol, cfg.rtol, desc)
        manifest["from"] = str(src)
        manifest["config"] = cfg.to_dict()
        atomic_write_json(export_dir / MANIFEST, manifest)
    check_verified(manifest, cfg.format)
    return manifest
