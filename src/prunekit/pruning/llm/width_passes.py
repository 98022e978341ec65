"""Width pruning's statistics from forward passes of the whole model (the fallback of the layer-by-layer pass).

:class:`~prunekit.pruning.llm.width._Pruner` measures each layer on carried hidden states
(:mod:`~prunekit.pruning.llm.carry`) where it can. Otherwise (``sequential=False``: one pass over the dense model;
too many calibration tokens to keep their hidden states; a model that does not pass a layer's output on as it is)
the statistics of layer ``l`` come from a forward pass cut at that layer: ``O(layers^2)`` layer calls, no activations
kept.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from .arch import Block, head_layout
from .reconstruct import dense_targets, layer_inputs

log = logging.getLogger(__name__)


def run_passes(pruner: Any, blocks: list[Block], layers: nn.Module, keep_mlp: int, keep_groups: int,
               keep_kv: int) -> None:
    """Statistics from forward passes of the whole model: once on the dense model (``sequential=False``) or,
    per layer, a pass cut at that layer (``O(layers^2)`` layer calls)."""
    plan = pruner.plan(blocks)
    dense: dict = {}
    if not pruner.cfg.sequential:  # everything from one pass over the dense model
        names = [n for v in plan.values() for n in v[0]]
        dense = pruner._stats(names, [n for v in plan.values() for n in v[1]], None)
    nq, nkv, hd = head_layout(pruner.lm.config) if pruner.cfg.head_ratio > 0 else (0, 0, 0)
    dense_h: list[torch.Tensor] | None = None  # the dense model's hidden states (reconstruction only)
    for b in blocks:
        t0 = time.perf_counter()
        if pruner.cfg.reconstruct() > 0:
            runs = layer_inputs(pruner.lm, layers[b.index], pruner.batches)
            dense_h = dense_targets(layers[b.index], dense_h or [h for h, _ in runs], runs)
        if pruner.cfg.head_ratio > 0:
            names, cov = plan[f"{b.prefix}:heads"]
            st = dense if not pruner.cfg.sequential else pruner._stats(names, cov, b.attn["o"])
            pruner._prune_heads(b, st, keep_groups, nq, nkv, hd)
        if pruner.cfg.kv_ratio > 0:
            names, cov = plan[f"{b.prefix}:kv"]
            pruner.merge_kv(b, dense if not pruner.cfg.sequential else pruner._stats(names, cov, b.attn["q"]), keep_kv)
        if pruner.cfg.mlp_ratio > 0:
            names, cov = plan[f"{b.prefix}:mlp"]
            st = dense if not pruner.cfg.sequential else pruner._stats(names, cov, b.consumer)
            pruner._prune_mlp(b, st, keep_mlp)
        if dense_h is not None:
            pruner.reconstruct(layers[b.index], runs, dense_h, b)
        log.info("layer %d/%d pruned (%.1f s)", b.index + 1, len(blocks), time.perf_counter() - t0)
