"""Width pruning with memory bounded by one decoder layer: weights read shard by shard, one layer resident at a time.

:func:`prune_width_streaming` prunes a ``save_pretrained`` folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) into another without ever building the whole model:

1. the model is built from its config on the ``meta`` device (shapes only, no memory);
2. only ``embed_tokens`` (and the rotary tables) are read, to turn the calibration ids into layer 0's inputs, which
   are kept (``N x T x hidden``, one layer's activations) with the arguments the model passes its layers (mask,
   position embeddings); the embedding goes back to ``meta``;
3. for each decoder layer: its tensors are read from the shards (:class:`ShardReader`, ``safe_open``), the layer
   is pruned exactly as :func:`~prunekit.pruning.llm.width.prune_width` with ``sequential=True`` prunes it (heads,
   then MLP, statistics from running this layer on the kept inputs, the same criteria and compensation), run once more
   to give the next layer its inputs, written to ``layers-XXXXX.safetensors`` and sent back to ``meta``;
4. the tensors outside the layers are copied from the source shards unchanged, then ``config.json`` and
   ``model.safetensors.index.json`` are written (after :func:`~prunekit.pruning.llm.layout.check_expressible`).

Resident at any time: one layer (twice while its pruned copy is sliced), the kept activations, the statistics of one
projection's inputs (``D^2`` float64 with ``lstsq``), and the embedding during step 2 only. Not bounded here: hidden
size pruning (it needs every RMSNorm at once) and ``add_bias`` are refused. Depth pruning and Wanda / SparseGPT
stream too: :mod:`~prunekit.pruning.llm.stream_depth`, :mod:`~prunekit.pruning.llm.stream_sparse` (the shared
machinery is :mod:`~prunekit.pruning.llm.stream_io`).

Example:
    >>> rep = prune_width_streaming("llama_dir", "pruned_dir", calib_ids, WidthSettings(mlp_ratio=0.5))
    >>> AutoModelForCausalLM.from_pretrained("pruned_dir")   # reloads as prune_width + save_pruned would write it
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import ConfigError

from .arch import _get, get_family, head_layout
from .layout import WIDTH_KEYS, check_expressible, config_changes, config_snapshot
from .stats import calibration_batches

# the shared streaming machinery; its names stay importable from here
from .stream_io import (  # noqa: F401
    ShardReader,
    _copy_rest,
    _finish,
    _layer_inputs,
    _materialize,
    _resident_layers,
    _with_kwargs,
    _write_layer,
    meta_model,
)
from .width import WidthSettings, _check_settings, _kept_groups, _kept_kv, _Pruner, kept_count

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_width_streaming(src: str | Path, out: str | Path, calib: torch.Tensor | list[torch.Tensor],
                          settings: WidthSettings | None = None, *, dtype: torch.dtype = torch.float32,
                          device: str = "cpu", batch_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """Width-prune the model folder ``src`` into ``out`` one decoder layer at a time (see the module docstring).

    Args:
        src: a ``save_pretrained`` folder (config.json + safetensors, sharded or not).
        out: the output folder (created; must not be ``src``).
        calib: calibration token ids, ``(N, T)`` or a list of ``(B, T)`` batches.
        settings: :class:`WidthSettings` (``sequential`` is always on here); keyword overrides replace its fields.
        dtype: the dtype layers are read, run and written in (e.g. ``torch.bfloat16``).

    Returns:
        The width report plus ``max_resident_layers`` and ``layers_read`` (the layers' read order).
    """
    settings = WidthSettings.build({**(settings.to_dict() if settings else {}), **overrides}, "prune_width_streaming")
    if settings.reconstruct_steps not in (0, "auto"):
        raise ConfigError(f"reconstruct_steps={settings.reconstruct_steps}: block reconstruction is not done when "
                          "streaming; use prune_width (in memory) or reconstruct_steps=0")
    if settings.reconstruct():
        log.warning("streaming: no block reconstruction after pruning attention (reconstruct_steps=auto would "
                    "run %d steps per layer in memory); expect a larger perplexity increase", settings.reconstruct())
    if settings.hidden_ratio > 0 or settings.add_bias:
        raise ConfigError("prune_width_streaming: hidden_ratio and add_bias change every layer at once; use "
                          "prune_width on the loaded model for them (hidden_ratio=0, add_bias=False here)")
    reader, lm, src, out = meta_model(src, out, "prune_width_streaming")
    fam = get_family(lm)
    _check_settings(settings, fam, lm.config)
    layers = _get(lm, fam.layers_path)
    blocks = fam.blocks(lm)
    inter = lm.get_submodule(blocks[0].producers[0]).weight.shape[0]
    keep_mlp = kept_count(inter, settings.mlp_ratio, settings.round_to)
    _, _, keep_groups = _kept_groups(settings, fam, lm.config)
    keep_kv = _kept_kv(settings, lm.config)
    nkv = head_layout(lm.config)[1]
    before, t0 = config_snapshot(lm.config), time.perf_counter()
    runs, kws = _layer_inputs(lm, fam.layers_path, calibration_batches(calib, batch_size), device, reader, dtype)
    pruner = _Pruner(lm, fam, settings, [])
    out.mkdir(parents=True, exist_ok=True)
    weight_map, peak = {}, 0
    for b in blocks:
        layer = _materialize(lm, b.prefix, reader, dtype, device)
        peak = max(peak, _resident_layers(layers))
        runs = pruner.prune_layer(layer, b, _with_kwargs(runs, kws[b.index]), keep_mlp, keep_groups, keep_kv)
        weight_map.update(_write_layer(layer, b.prefix, out / f"layers-{b.index:05d}.safetensors"))
        layer.to("meta")
        log.info("layer %d/%d pruned and written (%.1f s)", b.index + 1, len(blocks), time.perf_counter() - t0)
    pruner.set_config(keep_mlp, keep_groups, keep_kv)
    changes = config_changes(before, lm.config, WIDTH_KEYS, "width pruning")
    check_expressible(lm)  # shapes only: the meta layers keep their pruned shapes
    _finish(lm, reader, fam.layers_path, out, weight_map)
    return {"settings": settings.to_dict(), "model_type": lm.config.model_type, "intermediate_size": [inter, keep_mlp],
            "kv_groups": [nkv, keep_groups or keep_kv or None], "layers": pruner.records,
            "config_changes": changes, "max_resident_layers": peak, "seconds": time.perf_counter() - t0,
            "layers_read": sorted({int(n.split(".")[len(fam.layers_path.split("."))]) for n in reader.loaded
                                   if n.startswith(fam.layers_path + ".")})}

