"""``prunekit export``: what it prints (the stage is ``prunekit.pipeline.export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.export import EXPORT_DIR, ExportConfig


@prints("export")
def export_cmd(cfg: ExportConfig, manifest: dict[str, Any]) -> None:
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
