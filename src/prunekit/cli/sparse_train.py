"""``prunekit sparse-train``: sparse pre-training before structured pruning."""

from __future__ import annotations

from prunekit.cli.args import command
from prunekit.pipeline.sparse_stage import SparseConfig, sparse


@command("sparse-train", SparseConfig,
         help="Sparse pre-training before pruning: l1_group, bn_l1, gmp, variance_concentration")
def sparse_train_cmd(cfg: SparseConfig) -> None:
    m = sparse(cfg)
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%  method {m['method']}")
