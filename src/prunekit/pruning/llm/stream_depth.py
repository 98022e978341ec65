"""Depth pruning with memory bounded by one decoder layer: angular importance layer by layer, kept layers renumbered.

:func:`prune_depth_streaming` removes the least important decoder layers of a ``save_pretrained`` folder, writing
another, without building the whole model. The ``angular`` importance of :mod:`~prunekit.pruning.llm.depth` needs
only each layer's input and output hidden states, so it is computed one layer at a time on the dense model: layer
0's inputs come from the embedding alone, each layer is read from the shards, run on its inputs (its score is the
mean ``arccos(cos(h_in, h_out)) / pi`` over the calibration tokens, summed exactly as ``angular_importance`` sums it),
its outputs become the next layer's inputs, and it goes back to ``meta``. Then the kept layers' tensors are copied
from the shards, one layer at a time and unchanged (their stored dtype), under their new indices ``0..L'-1``; the
config is updated as :func:`~prunekit.pruning.llm.depth.remove_layers` updates it (``num_hidden_layers``,
``layer_types``, ``max_window_layers``) and the rest (embeddings, final norm, LM head) is copied.

The ``loss`` criterion runs the whole model once per layer and is refused here (``ConfigError``).

Example:
    >>> rep = prune_depth_streaming("llama_dir", "shallow_dir", calib_ids, DepthConfig(drop_layers=4))
    >>> rep["dropped"], rep["max_resident_layers"]
    ([9, 10, 11, 12], 1)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError

from .arch import _get, get_family
from .depth import DepthConfig, _hidden_out, remove_layers
from .layout import DEPTH_KEYS, config_changes, config_snapshot
from .stats import calibration_batches
from .stream_io import ShardReader, _finish, _layer_inputs, _materialize, _resident_layers, _with_kwargs, meta_model

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_depth_streaming(src: str | Path, out: str | Path, calib: torch.Tensor | list[torch.Tensor],
                          settings: DepthConfig | None = None, *, dtype: torch.dtype = torch.float32,
                          device: str = "cpu", batch_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """Remove the least important decoder layers of the folder ``src`` into ``out`` (see the module docstring).

    Args:
        src: a ``save_pretrained`` folder (config.json + safetensors, sharded or not).
        out: the output folder (created; must not be ``src``).
        calib: calibration token ids, ``(N, T)`` or a list of ``(B, T)`` batches.
        settings: :class:`DepthConfig` (``depth_criterion`` must be ``angular``); keyword overrides replace fields.
        dtype: the dtype the layers are run in for scoring (the written tensors keep their stored dtype).

    Returns:
        The report of ``prune_depth`` (layers, dropped, scores, params, config changes) plus
        ``max_resident_layers`` and ``layers_read``.
    """
    settings = DepthConfig.build({**(settings.to_dict() if settings else {}), **overrides}, "prune_depth_streaming")
    if settings.depth_criterion != "angular":
        raise ConfigError(f"depth_criterion={settings.depth_criterion!r}: the loss criterion runs the whole model "
                          "once per layer, which streaming (one layer resident) cannot do; valid here: angular "
                          "(or prune_depth on the loaded model)")
    reader, lm, src, out = meta_model(src, out, "prune_depth_streaming")
    fam = get_family(lm)
    layers = _get(lm, fam.layers_path)
    n_layers, n_drop = len(layers), settings.count(len(layers))
    if not 0 < n_drop < n_layers:
        raise ConfigError(f"prune_depth_streaming: drop_layers={settings.drop_layers}, layers_ratio="
                          f"{settings.layers_ratio} remove {n_drop} of {n_layers} decoder layers; remove between 1 "
                          f"and {n_layers - 1}")
    batches = calibration_batches(calib, batch_size)
    t0, before = time.perf_counter(), config_snapshot(lm.config)
    params_before = sum(p.numel() for p in lm.parameters())
    runs, kws = _layer_inputs(lm, fam.layers_path, batches, device, reader, dtype)
    scores, peak = [], 0
    for i in range(n_layers):
        layer = _materialize(lm, f"{fam.layers_path}.{i}", reader, dtype, device)
        peak = max(peak, _resident_layers(layers))
        score, runs = _angular(layer, _with_kwargs(runs, kws[i]))
        scores.append(score)
        layer.to("meta")
        log.info("layer %d/%d scored %.5f (%.1f s)", i + 1, n_layers, score, time.perf_counter() - t0)
    if not all(math.isfinite(s) for s in scores):
        raise PruningError(f"prune_depth_streaming: non-finite layer scores {scores}; check the calibration data")
    drop = sorted(torch.sort(torch.tensor(scores, dtype=torch.float64), stable=True).indices[:n_drop].tolist())
    keep = [i for i in range(n_layers) if i not in set(drop)]
    out.mkdir(parents=True, exist_ok=True)
    weight_map = _copy_kept(reader, fam.layers_path, keep, out)
    remove_layers(lm, fam.layers_path, drop)  # meta: the config and layer_idx as prune_depth leaves them
    changes = config_changes(before, lm.config, DEPTH_KEYS, "depth pruning")
    _finish(lm, reader, fam.layers_path, out, weight_map)
    log.info("depth pruning (streaming) %s: %d -> %d layers, dropped %s", lm.config.model_type, n_layers,
             len(keep), drop)
    depth = len(fam.layers_path.split("."))
    return {"settings": settings.to_dict(), "model_type": lm.config.model_type, "layers": [n_layers, len(keep)],
            "dropped": drop, "scores": [round(s, 6) for s in scores], "params_before": params_before,
            "params_after": sum(p.numel() for p in lm.parameters()), "config_changes": changes,
            "calib_tokens": sum(b.numel() for b in batches), "seconds": time.perf_counter() - t0,
            "max_resident_layers": peak,
            "layers_read": sorted({int(n.split(".")[depth]) for n in reader.loaded
                                   if n.startswith(fam.layers_path + ".")})}


def _angular(layer: nn.Module, runs: list) -> tuple[float, list]:
    """The layer's angular importance over its inputs ``runs`` and its outputs (the next layer's inputs)."""
    total, count, nxt = 0.0, 0, []
    for h, kw in runs:
        o = _hidden_out(layer(h, **kw)).detach()
        cos = nn.functional.cosine_similarity(h.double().flatten(0, -2), o.double().flatten(0, -2), dim=-1)
        cos = cos.clamp(-1, 1)  # (tokens,)
        total += float(torch.arccos(cos).sum() / math.pi)
        count += cos.numel()
        nxt.append((o, kw))
    return total / max(count, 1), nxt


def _copy_kept(reader: ShardReader, layers_path: str, keep: list[int], out: Path) -> dict[str, str]:
    """The kept layers' tensors, one layer at a time and unchanged, written under their new indices."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    for new, old in enumerate(keep):
        src_prefix, dst_prefix = f"{layers_path}.{old}.", f"{layers_path}.{new}."
        tensors = reader.load(reader.names(src_prefix))
        renamed = {dst_prefix + k[len(src_prefix):]: t.contiguous() for k, t in tensors.items()}
        name = f"layers-{new:05d}.safetensors"
        save_file(renamed, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(renamed, name))
        del tensors, renamed
    return weight_map
