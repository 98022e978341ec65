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
size pruning (it needs every RMSNorm at once) and ``add_bias`` are refused; depth, Wanda and SparseGPT still load the
whole model (see the report of issue 29).

Example:
    >>> rep = prune_width_streaming("llama_dir", "pruned_dir", calib_ids, WidthSettings(mlp_ratio=0.5))
    >>> AutoModelForCausalLM.from_pretrained("pruned_dir")   # reloads as prune_width + save_pruned would write it
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError

from .arch import _get, get_family, head_layout, in_features
from .layout import WIDTH_KEYS, check_expressible, config_changes, config_snapshot
from .stats import _Stop, calibration_batches
from .width import WidthSettings, _check_settings, _kept_groups, _kept_kv, _Pruner, kept_count

log = logging.getLogger(__name__)


class ShardReader:
    """Tensors of a ``save_pretrained`` folder by name, read from their shard with ``safe_open`` on demand."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise PruningError(f"{str(folder)!r}: no model.safetensors nor model.safetensors.index.json")
        self.loaded: list[str] = []  # every name read, in order (tests check that one layer is read at a time)

    def names(self, prefix: str = "", exclude: str | None = None) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix) and not (exclude and k.startswith(exclude))]

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` read shard by shard (each shard opened once, memory-mapped, closed after)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self.weight_map[n]].append(n)
        out = {}
        for file, ns in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for n in ns:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        self.loaded += names
        return out


def _materialize(lm: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype, device: str) -> nn.Module:
    """Module ``prefix`` of ``lm`` moved off ``meta`` and filled with its tensors from the shards."""
    m = lm.get_submodule(prefix)
    tensors = reader.load(reader.names(prefix + "."), dtype)
    # assign: the read tensors become the parameters (no second, empty copy of the layer is allocated)
    m.load_state_dict({k[len(prefix) + 1:]: v.to(device) for k, v in tensors.items()}, strict=True, assign=True)
    left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type == "meta"]
    if left:
        raise PruningError(f"streaming: {prefix}.{left[0]} is not stored in the checkpoint (a computed buffer); "
                           "this model type is not supported by prune_width_streaming (llama, mistral, qwen2 are)")
    return m


def _layer_inputs(lm: nn.Module, layers_path: str, batches: list[torch.Tensor], device: str,
                  reader: ShardReader, dtype: torch.dtype) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Layer 0's input hidden states and keyword arguments per calibration batch (only the embedding is read)."""
    emb = lm.get_input_embeddings()
    emb_name = next(n for n, m in lm.named_modules() if m is emb)
    _materialize(lm, emb_name, reader, dtype, device)
    for name, m in list(lm.named_modules()):  # rotary tables are computed, not stored: rebuild them off meta
        if type(m).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(lm.get_submodule(parent) if parent else lm, attr, type(m)(config=lm.config))
    runs: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        runs.append((h.detach(), {k: v for k, v in kw.items() if k not in ("cache", "past_key_values")}))
        raise _Stop

    handle = _get(lm, layers_path)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    lm(input_ids=b.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
        emb.to("meta")
    return runs


def _layer_stats(lm: nn.Module, layer: nn.Module, runs: list, names: list[str], cov: list[str]) -> dict:
    """Input moments of the modules ``names`` (covariance for ``cov``) over this layer's calibration inputs."""
    from prunekit.pruning.structured.stats import _Accumulator

    mods = dict(lm.named_modules())
    accs = {n: _Accumulator(in_features(mods[n]), n in cov, f"input of {n}") for n in dict.fromkeys(names)}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: accs[n].update(a[0], -1, None)) for n in accs]
    try:
        with torch.no_grad():
            for h, kw in runs:
                layer(h, **kw)
    finally:
        for hd in handles:
            hd.remove()
    return {n: a.result() for n, a in accs.items()}


def _resident_layers(layers: nn.ModuleList) -> int:
    return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)


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
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = WidthSettings.build({**(settings.to_dict() if settings else {}), **overrides}, "prune_width_streaming")
    if settings.reconstruct_steps:
        raise ConfigError(f"reconstruct_steps={settings.reconstruct_steps}: block reconstruction needs the dense "
                          "model's layer outputs beside the pruned layers, which streaming does not hold; use "
                          "prune_width (in memory) or reconstruct_steps=0")
    if settings.hidden_ratio > 0 or settings.add_bias:
        raise ConfigError("prune_width_streaming: hidden_ratio and add_bias change every layer at once; use "
                          "prune_width on the loaded model for them (hidden_ratio=0, add_bias=False here)")
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"prune_width_streaming: out {str(out)!r} is the source folder")
    reader = ShardReader(src)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).eval()
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
    runs = _layer_inputs(lm, fam.layers_path, calibration_batches(calib, batch_size), device, reader, dtype)
    pruner = _Pruner(lm, fam, settings, [])
    out.mkdir(parents=True, exist_ok=True)
    weight_map, peak = {}, 0
    for b in blocks:
        layer = _materialize(lm, b.prefix, reader, dtype, device)
        peak = max(peak, _resident_layers(layers))
        runs = _prune_layer(lm, layer, b, pruner, runs, keep_mlp, keep_groups, keep_kv)
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


def _prune_layer(lm: nn.Module, layer: nn.Module, b: Any, pruner: _Pruner, runs: list, keep_mlp: int,
                 keep_groups: int, keep_kv: int = 0) -> list:
    """Heads then MLP of one layer, each on statistics of this layer's inputs; returns the next layer's inputs."""
    cfg = pruner.cfg
    if cfg.head_ratio > 0:
        nq, nkv, hd = head_layout(lm.config)
        names, cov = pruner._needed(b.attn["q"], b.attn["o"])
        pruner._prune_heads(b, _layer_stats(lm, layer, runs, names, cov), keep_groups, nq, nkv, hd)
    if cfg.kv_ratio > 0:
        q = [b.attn["q"]]
        pruner.merge_kv(b, _layer_stats(lm, layer, runs, q, q), keep_kv)
    if cfg.mlp_ratio > 0:
        names, cov = pruner._needed(b.producers[0], b.consumer)
        pruner._prune_mlp(b, _layer_stats(lm, layer, runs, names, cov), keep_mlp)
    nxt = []
    for h, kw in runs:
        o = layer(h, **kw)
        nxt.append(((o[0] if isinstance(o, tuple) else o).detach(), kw))
    return nxt


def _finish(lm: nn.Module, reader: ShardReader, layers_path: str, out: Path, weight_map: dict[str, str]) -> None:
    """The tensors outside the layers, config.json, generation_config.json and the index."""
    weight_map.update(_copy_rest(reader, layers_path, out))
    lm.config.save_pretrained(out)
    if (reader.folder / "generation_config.json").is_file():
        shutil.copy2(reader.folder / "generation_config.json", out / "generation_config.json")
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _write_layer(layer: nn.Module, prefix: str, path: Path) -> dict[str, str]:
    from safetensors.torch import save_file

    tensors = {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dict.fromkeys(tensors, path.name)


def _copy_rest(reader: ShardReader, layers_path: str, out: Path) -> dict[str, str]:
    """The tensors outside the decoder layers (embeddings, final norm, LM head), unchanged: a shard that holds only
    those is copied as a file (no memory), the others one tensor at a time."""
    from safetensors.torch import save_file

    rest = reader.names(exclude=layers_path + ".")
    layer_files = {reader.weight_map[n] for n in reader.names(layers_path + ".")}
    whole = {reader.weight_map[n] for n in rest} - layer_files
    weight_map = {}
    for i, f in enumerate(sorted(whole)):
        name = f"rest-{i:05d}.safetensors"
        shutil.copy2(reader.folder / f, out / name)
        weight_map.update({n: name for n in rest if reader.weight_map[n] == f})
    for i, n in enumerate(n for n in rest if reader.weight_map[n] not in whole):
        name = f"rest-t{i:05d}.safetensors"
        save_file({n: reader.load([n])[n].contiguous()}, str(out / name), metadata={"format": "pt"})
        weight_map[n] = name
    return weight_map
