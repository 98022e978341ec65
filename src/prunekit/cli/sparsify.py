"""``prunekit sparsify``: what it prints (the stage is ``prunekit.pipeline.sparsify``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.sparsify import SparsifyConfig


@prints("sparsify")
def sparsify_cmd(cfg: SparsifyConfig, m: dict[str, Any]) -> None:
    if "top1" not in m:  # a causal LM folder: perplexity instead of top-1
        ppl = f"  perplexity {m['ppl_before']:.4f} -> {m['ppl_after']:.4f}" if "ppl_after" in m else ""
        print(f"wrote {cfg.out}: sparsity {m['sparsity']:.4f} of the decoder blocks' linear weights{ppl}  non-zero "
              f"params {m['nonzero_params'] / 1e6:.2f} M of {m['params'] / 1e6:.2f} M")
        return
    was = f" (was {m['top1_before']:.2f}%)" if m.get("top1_before") is not None else ""
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%{was}  sparsity {m['sparsity']:.4f} of the sparsified weights "
          f"({m['sparsified_layers']} layers; whole model {m['model_sparsity']:.4f})  "
          f"non-zero params {m['nonzero_params'] / 1e3:.1f} K of {m['params'] / 1e3:.1f} K  "
          f"(dense MACs unchanged: {m['macs'] / 1e6:.2f} M)")
