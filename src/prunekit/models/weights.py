"""Load a local weights file (``--weights PATH``) into a freshly built model.

Accepted: safetensors files, and state dicts saved with ``torch.save`` (read with ``weights_only=True``), also when
nested under ``state_dict``/``model``/... (Lightning, training checkpoints) or saved from a wrapper (``module.``
from DDP, ``_orig_mod.`` from ``torch.compile``, ``model.`` from our HF wrapper): the key prefix that makes the file
match the model is found automatically. Anything that does not match exactly raises a ``ConfigError`` naming
``--weights``, the path and the first offending keys.

Example:
    >>> model = prunekit.create_model("resnet20", weights="resnet20_cifar10.pt")
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError

log = logging.getLogger(__name__)

CHECK_FLAGS = ("Check --model, --dataset (it sets the input channels and the number of classes) and --model-kwargs "
               "(in Python: create_model's name, in_channels, num_classes and keyword arguments); a pruned model is "
               "loaded from its run directory (--from), not through --weights")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
_SHOW = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a ``torch.save``d state dict (nesting unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--weights: file {str(path)!r} does not exist")
    with open(p, "rb") as f:
        head = f.read(8)
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"  # zip archive (torch.save) or legacy pickle
    try:
        if not is_torch:
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "torch.save file" if is_torch else "safetensors file"
        raise ConfigError(f"--weights: cannot read {str(path)!r} as a {kind} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}); expected safetensors or a state dict "
                          f"saved with torch.save(model.state_dict(), path)") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    for _ in range(4):  # {"state_dict": {...}}, {"model": {"module": {...}}}, ...
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ConfigError(f"--weights: {str(path)!r} holds no state dict (found {keys}); save one with "
                      f"torch.save(model.state_dict(), path) or safetensors")


def _best_prefix_map(file_keys: list[str], model_keys: set[str]) -> tuple[str, str]:
    """(strip, add) such that ``add + key[len(strip):]`` matches the most model keys (e.g. ("module.", ""))."""
    candidates: Counter[tuple[str, str]] = Counter({("", ""): 0})
    for f in file_keys[:50]:
        for m in model_keys:
            if m.endswith(f) and (len(m) == len(f) or m[-len(f) - 1] == "."):
                candidates[("", m[: len(m) - len(f)])] += 1
            elif f.endswith(m) and f[-len(m) - 1] == ".":
                candidates[(f[: len(f) - len(m)], "")] += 1

    def score(sa: tuple[str, str]) -> int:
        s, a = sa
        return sum(1 for k in file_keys if k.startswith(s) and a + k[len(s):] in model_keys)

    return max(candidates, key=lambda sa: (score(sa), sa == ("", "")))


def _listed(items: list[str], sep: str = ", ") -> str:
    """The first ``_SHOW`` items, then how many more: a mismatch of 107 keys is one short line, not 107."""
    more = f"{sep}... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return sep.join(items[:_SHOW]) + more


def mismatch_summary(target: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """``None`` when the file's tensors (name -> shape) fit the model's state dict ``target``; else one line: the
    first few shape mismatches, missing and unexpected keys, each with how many more there are. A missing key that
    is another name of a tensor the file holds (tied weights) is fine."""
    unexpected = sorted(k for k in shapes if k not in target)
    loaded_ids = {id(target[k]) for k in shapes if k in target}
    missing = sorted(k for k in target if k not in shapes and id(target[k]) not in loaded_ids)
    mismatched = [f"{k}: file {tuple(s)} vs model {tuple(target[k].shape)}" for k, s in sorted(shapes.items())
                  if k in target and tuple(s) != tuple(target[k].shape)]
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches ({_listed(mismatched, '; ')})")
    if missing:
        parts.append(f"{len(missing)} keys missing from the file ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file ({_listed(unexpected)})")
    return "; ".join(parts) or None


def file_mismatch(model: nn.Module, path: str | Path) -> str | None:
    """``mismatch_summary`` of a safetensors file against ``model``, read from the file's header (no tensor is
    loaded); ``None`` when it fits or cannot be read."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception:  # noqa: BLE001 - a damaged file: the caller says it cannot be read
        return None
    return mismatch_summary(model.state_dict(keep_vars=True), shapes)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the tensors of ``path`` into ``model`` (in place); every key must match in name and shape.

    Tied parameters (one tensor under two names) may be stored once. Returns ``model``.
    """
    sd = read_state_dict(path)
    target = model.state_dict(keep_vars=True)
    strip, add = _best_prefix_map(sorted(sd), set(target))
    if strip or add:
        log.info("--weights %s: mapping key prefix %r -> %r", path, strip, add)
        sd = {add + k[len(strip):] if k.startswith(strip) else k: v for k, v in sd.items()}
    # old checkpoints may hold buffers the model keeps out of its state dict (e.g. BERT's position_ids): skip them
    transient = {k for k, _ in model.named_buffers() if k not in target}
    sd = {k: v for k, v in sd.items() if k not in transient}
    problem = mismatch_summary(target, {k: tuple(v.shape) for k, v in sd.items()})
    if problem:
        raise ConfigError(f"--weights: {str(path)!r} does not match the model: {problem}. {CHECK_FLAGS}")
    with torch.no_grad():
        for k, v in sd.items():
            target[k].copy_(v)
    return model
