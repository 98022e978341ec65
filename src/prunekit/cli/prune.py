"""``prunekit prune``: the CLI wrapper of ``prunekit.pipeline.prune``."""

from __future__ import annotations

from prunekit.cli.args import command
from prunekit.pipeline.prune import PruneConfig, prune_run


@command("prune", PruneConfig, help="Prune the model of a run directory (structured: channels, heads)")
def prune_cmd(cfg: PruneConfig) -> None:
    m = prune_run(cfg)
    was = f" (was {m['top1_before']:.2f}%)" if m.get("top1_before") is not None else ""
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%{was}  MACs {m['macs'] / 1e6:.2f} M "
          f"({100 * m['macs_kept']:.1f}% kept)  params {m['params'] / 1e3:.1f} K")
