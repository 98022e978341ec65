"""``prunekit quantize``: what it prints (the stage is ``prunekit.pipeline.quantize``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.quantize import QuantizeStageConfig


@prints("quantize")
def quantize_cmd(cfg: QuantizeStageConfig, m: dict[str, Any]) -> None:
    lat = ""
    if m.get("latency"):
        b = m["backend"]
        fp32, int8 = m["latency"][f"{b}_float32"]["median_ms"], m["latency"][f"{b}_int8"]["median_ms"]
        lat = f"  latency ({b}, batch 1, {cfg.quantize.threads} threads) {fp32:.2f} ms float32 -> {int8:.2f} ms int8"
    print(f"wrote {cfg.out}: {m['backend']} int8 top1 {m['top1']:.2f}% (float {m['top1_float']:.2f}%)  "
          f"{m['bytes_float'] / 1e6:.2f} MB -> {m['bytes_int8'] / 1e6:.2f} MB{lat}")
