"""Wanda / SparseGPT / magnitude sparsity with memory bounded by one decoder layer (weights read shard by shard).

:func:`sparsify_streaming` sparsifies a ``save_pretrained`` folder into another, with the same masks and weights as
:func:`~prunekit.pruning.llm.sparse.prune_decoder` computes on the model in memory, but never builds the whole model:
the model is built on ``meta``, layer 0's inputs come from the embedding alone, then each decoder layer in turn is
read from the shards, its linear layers are calibrated on the inputs it receives (the same statistics, the same
``sequential`` groups, SparseGPT's same ``blocksize`` / ``damp``), pruned, run once more to give the next layer its
inputs (the PRUNED layer's outputs, as ``prune_decoder`` does), written and sent back to ``meta``
(:mod:`~prunekit.pruning.llm.stream_io`).

The output is dense storage with zeros: no mask buffers, so plain ``AutoModelForCausalLM.from_pretrained`` reloads
it (the file is as large as the dense one; the sparsity is in the values). Embeddings and the LM head are copied
unchanged.

Example:
    >>> rep = sparsify_streaming("llama_dir", "sparse_dir", calib_ids, "sparsegpt", sparsity=0.5,
    ...                          dtype=torch.bfloat16)
    >>> rep["sparsity"], rep["max_resident_layers"]
    (0.5, 1)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError

from .decoder import select_decoder_layers
from .sparse import (
    NEEDS_DATA,
    DecoderSparsity,
    _block_stats,
    _choose_layers,
    _input_groups,
    _prune_layer,
    _run_block,
    check_method,
    check_target,
)
from .stats import calibration_batches
from .stream_io import _finish, _layer_inputs, _materialize, _resident_layers, _with_kwargs, _write_layer, meta_model

log = logging.getLogger(__name__)


@torch.no_grad()
def sparsify_streaming(src: str | Path, out: str | Path, calib: torch.Tensor | list[torch.Tensor] | None,
                       method: str = "wanda", *, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                       only: Iterable[str] = (), ignore: Iterable[str] = (), dtype: torch.dtype = torch.float32,
                       device: str = "cpu", batch_size: int = 8, max_batches: int | None = None,
                       blocksize: int = 128, damp: float = 0.01, sequential: bool = False) -> dict[str, Any]:
    """Sparsify the model folder ``src`` into ``out`` one decoder layer at a time (see the module docstring).

    Args:
        src: a ``save_pretrained`` folder (config.json + safetensors, sharded or not).
        out: the output folder (created; must not be ``src``).
        calib: calibration token ids, ``(N, T)`` or a list of ``(B, T)`` batches (``magnitude``: may be ``None``).
        method: ``wanda``, ``sparsegpt`` or ``magnitude``.
        sparsity, nm: the fraction of each layer's weights zeroed, or an ``(N, M)`` pattern; as ``prune_decoder``.
        only, ignore: regexes of layer names (``select_decoder_layers``); default every linear layer of the blocks.
        dtype: the dtype layers are read, run and written in (e.g. ``torch.bfloat16``).
        max_batches, blocksize, damp, sequential: as ``prune_decoder``.

    Returns:
        ``method``, ``target``, ``nm``, ``sparsity``, per-layer ``layers``, ``skipped``, ``tokens``, ``seconds``,
        ``max_resident_layers`` and ``layers_read``.
    """
    t0 = time.perf_counter()
    method, target = check_method(method), check_target(sparsity, nm)
    reader, lm, src, out = meta_model(src, out, "sparsify_streaming")
    only, ignore = list(only), list(ignore)
    chosen_in = select_decoder_layers(lm, only, ignore).layers if only or ignore else None
    prefix, blocks, chosen, skipped = _choose_layers(lm, method, chosen_in, nm)
    result = DecoderSparsity(method=method, target=target, nm=nm, layers={}, skipped=skipped)
    runs: list[tuple[torch.Tensor, dict[str, Any]]] = []
    kws: list[list[dict[str, Any]]] = []
    if method in NEEDS_DATA:
        if calib is None:
            raise PruningError(f"method {method!r} needs calibration data: pass calib (token ids (N, T))")
        batches = calibration_batches(calib, batch_size)[:max_batches]
        result.tokens = sum(b.numel() for b in batches)
        runs, kws = _layer_inputs(lm, prefix, batches, device, reader, dtype)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    peak = 0
    for b in range(len(blocks)):
        layer = _materialize(lm, f"{prefix}.{b}", reader, dtype, device)
        peak = max(peak, _resident_layers(blocks))
        here = {n: m for n, m in chosen.items() if n.startswith(f"{prefix}.{b}.")}
        runs = _with_kwargs(runs, kws[b]) if runs else runs
        runs = _sparsify_layer(layer, here, runs, result, blocksize, damp, sequential, last=b + 1 == len(blocks))
        weight_map.update(_write_layer(layer, f"{prefix}.{b}", out / f"layers-{b:05d}.safetensors"))
        layer.to("meta")
        log.info("%s: layer %d/%d sparsified and written (%.1f s)", method, b + 1, len(blocks),
                 time.perf_counter() - t0)
    _finish(lm, reader, prefix, out, weight_map)
    result.seconds = time.perf_counter() - t0
    return {"method": method, "target": target, "nm": list(nm) if nm else None, "sparsity": result.sparsity,
            "layers": result.layers, "skipped": result.skipped, "tokens": result.tokens, "seconds": result.seconds,
            "max_resident_layers": peak, "layers_read": _layers_read(reader.loaded, prefix)}


def _sparsify_layer(layer: nn.Module, here: dict[str, nn.Module], runs: list, result: DecoderSparsity,
                    blocksize: int, damp: float, sequential: bool, last: bool) -> list:
    """Calibrate and prune the linear layers ``here`` of one decoder layer (zeros folded into the weights, counts
    added to ``result``); returns the next layer's inputs (the pruned layer's outputs)."""
    hidden = [h for h, _ in runs]
    captured = [((h,), kw) for h, kw in runs]  # prune_decoder's (args, kwargs) form
    groups = _input_groups(layer, here, hidden[0], captured[0]) if sequential and runs else [here]
    for group in groups:  # sequential: pruned groups feed the next ones of the same layer
        stats = _block_stats(result.method, layer, group, hidden, captured) if result.method in NEEDS_DATA else {}
        for n, m in group.items():
            keep = _prune_layer(result.method, m, stats.pop(n, None), result.target, result.nm, blocksize, damp)
            m.weight.mul_(keep.to(m.weight.dtype))  # dense storage with zeros: no mask buffer is written
            # (stats.pop above: a Hessian, (in, in), is freed once its layer is pruned)
            zeros = int((m.weight == 0).sum())
            result.layers[n] = zeros / m.weight.numel()
            result._zeros += zeros
            result._numel += m.weight.numel()
        stats.clear()
    if last or not runs:
        return runs
    return [(_run_block(layer, h, (h,), kw), kw) for h, kw in runs]


def _layers_read(loaded: list[str], prefix: str) -> list[int]:
    """The decoder layers whose tensors were read, in index order."""
    depth = len(prefix.split("."))
    return sorted({int(n.split(".")[depth]) for n in loaded if n.startswith(prefix + ".")})
