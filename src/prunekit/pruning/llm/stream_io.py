"""The machinery of streaming pruning (one decoder layer resident at a time), shared by
:mod:`~prunekit.pruning.llm.stream` (width), :mod:`~prunekit.pruning.llm.stream_sparse` (Wanda / SparseGPT /
magnitude) and :mod:`~prunekit.pruning.llm.stream_depth` (depth).

- :class:`ShardReader`: tensors of a ``save_pretrained`` folder by name, read from their shard on demand;
- :func:`meta_model`: the model built from its config on the ``meta`` device (shapes only, no memory);
- :func:`_layer_inputs`: layer 0's inputs for the calibration ids and every layer's keyword arguments (only the
  embedding is read);
- :func:`_materialize` / ``layer.to("meta")``: one module filled from the shards, then sent back;
- :func:`_write_layer`, :func:`_finish`: the output folder (one file per layer, the rest copied, config, index).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from prunekit.config import Config
from prunekit.errors import ConfigError, PruningError

from .arch import _get
from .carry import Runs, capture
from .carry import with_kwargs as _with_kwargs  # noqa: F401  (the streaming modules import it from here)


class StreamConfig(Config):
    """Streaming (``--stream``): prune a model folder one decoder layer at a time, read from its safetensors shards,
    in ``dtype``; memory is bounded by one layer instead of the whole model."""

    stream: bool = Field(False, description="prune one decoder layer at a time from the safetensors shards (memory "
                         "bounded by one layer, not the model); width, depth, wanda, sparsegpt")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "float32", description="with --stream: the dtype layers are read, run and written in")

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


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
                           "this model type is not supported by the streaming functions (llama, mistral, qwen2 are)")
    return m




def _layer_inputs(lm: nn.Module, layers_path: str, batches: list[torch.Tensor], device: str,
                  reader: ShardReader, dtype: torch.dtype) -> tuple[Runs, list[list[dict[str, Any]]]]:
    """Layer 0's inputs per calibration batch, and every layer's keyword arguments per batch (only the embedding is
    read; :func:`~prunekit.pruning.llm.carry.capture` with the meta layers made identities)."""
    emb = lm.get_input_embeddings()
    emb_name = next(n for n, m in lm.named_modules() if m is emb)
    _materialize(lm, emb_name, reader, dtype, device)
    for name, m in list(lm.named_modules()):  # rotary tables are computed, not stored: rebuild them off meta
        if type(m).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(lm.get_submodule(parent) if parent else lm, attr, type(m)(config=lm.config))
    try:
        return capture(lm, _get(lm, layers_path), batches, device)
    except PruningError as e:
        raise PruningError(f"streaming: {e}") from None
    finally:
        emb.to("meta")


def _resident_layers(layers: nn.ModuleList) -> int:
    return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)



def meta_model(src: str | Path, out: str | Path, what: str) -> tuple[ShardReader, nn.Module, Path, Path]:
    """(reader of ``src``, the model of ``src`` on ``meta`` in eval mode, ``src``, ``out``); ``out`` must differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"{what}: out {str(out)!r} is the source folder")
    reader = ShardReader(src)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).eval()
    return reader, lm, src, out


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
