"""What a run's weights file says without building the model: per-layer channel counts, sparsity, magnitudes.

Everything reads ``model.safetensors`` with ``safetensors.safe_open`` (shapes come from the header, so channel
counts cost no tensor reads). A *layer* here is a weight tensor of two or more dimensions (conv, linear,
embedding); its output channels are its first dimension.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit import runs
from prunekit.errors import RunDirError


def _open(run_dir: str | Path):
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / runs.WEIGHTS
    if not path.is_file():
        raise RunDirError(f"{str(run_dir)!r} has no {runs.WEIGHTS}")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise RunDirError(f"{path} is corrupt: {e}") from None


def _is_layer(name: str, shape: list[int]) -> bool:
    return name.endswith("weight") and len(shape) >= 2


def _natural(name: str) -> list:
    """``features.10`` after ``features.3``: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@functools.lru_cache(maxsize=32)
def _module_order(spec_json: str) -> dict[str, int]:
    spec = runs.ModelSpec.from_dict(json.loads(spec_json))
    ref = runs.build_reference(spec)
    return {} if ref is None else {n: i for i, (n, _) in enumerate(ref.named_modules())}


def in_model_order(run_dir: str | Path, names: Iterable[str]) -> list[str]:
    """``names`` (module paths) in the order the model defines its modules (its registry model built on the meta
    device); names it does not know, and every name when it cannot be built, follow in natural order."""
    try:
        order = _module_order(json.dumps(runs.read_spec(run_dir).to_dict(), sort_keys=True))
    except Exception:  # an unreadable spec or a model that cannot be built: natural order is still readable
        order = {}
    return sorted(names, key=lambda n: (order.get(n, len(order)), _natural(n)))


def weight_shapes(run_dir: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every tensor in the run's weights file (header only, nothing loaded)."""
    with _open(run_dir) as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def layer_channels(run_dir: str | Path) -> dict[str, int]:
    """Layer name (the weight's module path) -> output channels, in file order.

    Example:
        >>> layer_channels("runs/pruned")["layer1.0.conv1"]
        10
    """
    ch = {k[: -len(".weight")]: s[0] for k, s in weight_shapes(run_dir).items() if _is_layer(k, s)}
    return {n: ch[n] for n in in_model_order(run_dir, ch)}


def reference_channels(run_dir: str | Path) -> dict[str, int]:
    """Output channels per layer of the *unpruned* architecture of a run (its registry model freshly built on the
    meta device, no weights): the "before" when no baseline run directory is reachable. Empty when it cannot be
    built."""
    spec = runs.read_spec(run_dir)
    ref = runs.build_reference(spec)
    if ref is None:
        return {}
    return {n[: -len(".weight")]: int(p.shape[0]) for n, p in ref.named_parameters()
            if _is_layer(n, list(p.shape))}  # named_parameters is already in model order


@dataclass
class WeightScan:
    """One pass over a run's layer weights."""

    sparsity: dict[str, float]  # layer -> fraction of exactly-zero weights
    zeros: int  # zero weights over all layers
    total: int  # weights over all layers
    magnitudes: torch.Tensor  # |w|, 1-D, subsampled to at most max_values (exact zeros kept)

    @property
    def overall_sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def scan_weights(run_dir: str | Path, max_values: int = 200_000, seed: int = 0) -> WeightScan:
    """Per-layer sparsity (fraction of exact zeros), overall sparsity and a sample of |w| of a run's layer weights.

    The magnitudes are uniformly subsampled to ``max_values`` with a fixed seed, so a histogram of a large model
    stays cheap and two runs of the same model are sampled alike.

    Example:
        >>> scan = scan_weights("runs/sparse")
        >>> scan.overall_sparsity, max(scan.sparsity.values())
    """
    sparsity: dict[str, float] = {}
    parts, zeros, total = [], 0, 0
    with _open(run_dir) as f:
        for k in f.keys():
            if not _is_layer(k, list(f.get_slice(k).get_shape())):
                continue
            t = f.get_tensor(k).detach().float()
            if not t.numel():
                continue
            z = int((t == 0).sum())
            sparsity[k[: -len(".weight")]] = z / t.numel()
            zeros, total = zeros + z, total + t.numel()
            parts.append(t.abs().flatten())
    flat = torch.cat(parts) if parts else torch.empty(0)
    if flat.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=g)[:max_values]]
    return WeightScan({n: sparsity[n] for n in in_model_order(run_dir, sparsity)}, zeros, total, flat)
