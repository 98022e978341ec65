"""``prunekit prune``: what it prints (the stage is ``prunekit.pipeline.prune``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.prune import PruneConfig


@prints("prune")
def prune_cmd(cfg: PruneConfig, m: dict[str, Any]) -> None:
    was = f" (was {m['top1_before']:.2f}%)" if m.get("top1_before") is not None else ""
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%{was}  MACs {m['macs'] / 1e6:.2f} M "
          f"({100 * m['macs_kept']:.1f}% kept)  params {m['params'] / 1e3:.1f} K")
