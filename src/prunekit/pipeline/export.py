"""``prunekit export``: a run directory's model (or a Hugging Face causal LM folder) written as ONNX / TorchScript /
torch.export, optionally verified against torch. The exporting is ``prunekit.export``; this is the stage around it.

Where the files go:

- default: into the source run directory's ``export/`` folder (the run's own files are not touched)::

      runs/pruned/export/model.onnx  model.torchscript.pt  model.pt2  export.json  log.txt

- ``--out DIR``: a new run directory holding a copy of the source's model files, config, metrics and log
  (``metrics.json`` gains ``exported_from``), with the exports in ``DIR/export/``.

Example::

    prunekit export --from runs/pruned --format onnx,exported --verify
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config
from prunekit.export.core import EXPORT_BATCH, FORMATS, ExportOptions
from prunekit.export.stage import EXPORT_DIR, MANIFEST, check_verified, export_model, verification_inputs
from prunekit.pipeline import detect
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import prepare_out, refuse_same_folder

log = logging.getLogger(__name__)


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
    rtol: float = Field(1e-4, ge=0, description="--verify: relative tolerance added to --atol (|diff| <= atol + "
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


def _copy_run(src: Path, out: Path) -> None:
    for f in sorted(runs.RUN_FILES | {runs.HISTORY}):
        if (src / f).is_file() and f != runs.METRICS:
            shutil.copy2(src / f, out / f)
    metrics = runs.read_metrics(src) if (src / runs.METRICS).is_file() else {}  # save_model writes none
    runs.write_metrics(out, {**metrics, "exported_from": str(src)})


@register("export", ExportConfig, help="Export a run directory's model to ONNX / TorchScript / torch.export (.pt2), "
          "optionally verified against torch (into DIR/export/, or a new run dir --out)", writes_run=False)
def export_run(cfg: ExportConfig) -> dict[str, Any]:
    """Export the model of ``cfg.from_dir`` (see the module docstring for where the files go); returns the manifest.

    Raises ``ExportError`` naming the differences when ``cfg.verify`` and an export differs from torch.

    Example:
        >>> export_run(ExportConfig.build({"from": "runs/pruned", "format": ["onnx"], "verify": True}))
    """
    from prunekit.pipeline.llm import is_hf_folder

    if is_hf_folder(cfg.from_dir):  # a causal LM folder of prune-llm / sparsify: ONNX of ids -> logits
        from prunekit.pipeline.llm_folders import export_llm

        return export_llm(cfg)
    src = runs.check_model_dir(cfg.from_dir)  # a run directory, or a folder of prunekit.save_model
    refuse_same_folder(cfg.out, src, fix=f"leave --out out to export into {str(src / EXPORT_DIR)!r}")
    if cfg.out is not None:
        run_dir = log_dir = prepare_out(cfg)
        _copy_run(src, run_dir)
    else:
        run_dir, log_dir = src, src / EXPORT_DIR
    export_dir = run_dir / EXPORT_DIR
    with runs.run_log(log_dir):
        model = detect.export_form(runs.load_model(src))  # a YOLO model: its decoded predictions alone
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
