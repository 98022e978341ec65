"""``prunekit export --from DIR --format onnx,torchscript,exported [--verify]``."""

from __future__ import annotations

from pathlib import Path

from prunekit.cli.args import command
from prunekit.export.stage import EXPORT_DIR, ExportConfig, export_run
from prunekit.pipeline.llm import is_hf_folder


@command("export", ExportConfig, help="Export a run directory's model to ONNX / TorchScript / torch.export (.pt2), "
                                      "optionally verified against torch (into DIR/export/, or a new run dir --out)")
def run(cfg: ExportConfig) -> None:
    if is_hf_folder(cfg.from_dir):  # a causal LM folder of prune-llm / sparsify: ONNX of ids -> logits
        from prunekit.pipeline.llm_folders import export_llm

        manifest = export_llm(cfg)
    else:
        manifest = export_run(cfg)  # raises (exit 2, the differences printed) when --verify fails
    folder = Path(cfg.out or cfg.from_dir) / EXPORT_DIR
    for name, info in manifest["formats"].items():
        if name not in cfg.format:
            continue
        line = f"{name:12} {folder / info['file']}  ({info['bytes'] / 1e6:.2f} MB"
        line += f", opset {info['opset']}, {info['exporter']} exporter)" if "opset" in info else ")"
        if "verify" in info:
            v = info["verify"]
            line += f"  verified: max abs diff {v['max_abs_diff']:.2e} (batch {v['batch_size']})"
        print(line)
