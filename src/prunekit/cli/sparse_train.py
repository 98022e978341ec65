"""``prunekit sparse-train``: what it prints (the stage is ``prunekit.pipeline.sparse_stage``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.sparse_stage import SparseConfig


@prints("sparse-train")
def sparse_train_cmd(cfg: SparseConfig, m: dict[str, Any]) -> None:
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%  method {m['method']}")
