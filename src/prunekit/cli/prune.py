"""``prunekit prune``: what it prints (the stage is ``prunekit.pipeline.prune``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.cli.train import score
from prunekit.pipeline.prune import PruneConfig


@prints("prune")
def prune_cmd(cfg: PruneConfig, m: dict[str, Any]) -> None:
    if "top1" not in m and "map50_95" in m:  # a detector
        print(f"wrote {cfg.out}: {score(m)} (was {m.get('map50_95_before', float('nan')):.3f})  MACs "
              f"{m['macs'] / 1e6:.2f} M ({100 * m['macs_kept']:.1f}% kept)  params {m['params'] / 1e3:.1f} K")
        return
    was = f" (was {m['top1_before']:.2f}%)" if m.get("top1_before") is not None else ""
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%{was}  MACs {m['macs'] / 1e6:.2f} M "
          f"({100 * m['macs_kept']:.1f}% kept)  params {m['params'] / 1e3:.1f} K")
