"""The dense architecture of a saved model and its layer diff: ``ModelSpec`` (what ``model.json`` holds).

A pruned model is recorded as a dense architecture (a registry name, an importable constructor + JSON kwargs, or
nothing when the caller passes a builder at load) plus the *layer diff*: the parameter/buffer shapes, scalar
attributes and Hugging Face config fields of every module that differs from a fresh build of that architecture.
``apply_diff`` puts the diff back over a fresh build; the weights are loaded afterwards (see ``prunekit.runs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import RunDirError

SPEC_FORMAT = 1

# scalar attribute types worth recording (num_heads, out_channels, normalized_shape, ...)
_SCALARS = (bool, int, float, str)


# ----------------------------------------------------------------------------------------------- layer diff
def _attr_ok(v: Any) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v)


def _config_fields(m: nn.Module) -> dict[str, Any]:
    """Scalar fields of a Hugging Face ``PretrainedConfig`` held by ``m`` (``m.config``), else ``{}``."""
    cfg = m.__dict__.get("config")
    if cfg is None or not callable(getattr(cfg, "to_dict", None)) or isinstance(cfg, dict):
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
            if not k.startswith("_") and _attr_ok(v)}


def _module_state(m: nn.Module) -> dict[str, Any]:
    params = {k: (None if p is None else list(p.shape)) for k, p in m._parameters.items()}
    buffers = {k: (None if b is None else list(b.shape)) for k, b in m._buffers.items()}
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items()
             if not k.startswith("_") and k != "training" and _attr_ok(v)}
    return {"params": params, "buffers": buffers, "attrs": attrs, "config": _config_fields(m)}


def module_diff(model: nn.Module, reference: nn.Module | None) -> dict[str, Any]:
    """Per-module parameter/buffer shapes, scalar attributes and HF config fields of ``model`` that differ from
    ``reference``. With no reference every module with parameters is recorded."""
    ref = dict(reference.named_modules()) if reference is not None else {}
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        cur = _module_state(m)
        if name in ref:
            old = _module_state(ref[name])
            d = {kind: {k: v for k, v in cur[kind].items() if old[kind].get(k, "missing") != v}
                 for kind in ("params", "buffers", "attrs", "config")}
        else:
            d = {k: v for k, v in cur.items() if k != "config"}
        d = {k: v for k, v in d.items() if v}
        if d:
            out[name] = d
    return out


def apply_diff(model: nn.Module, diff: dict[str, Any]) -> nn.Module:
    """Resize parameters/buffers and set attributes so that ``model`` has the recorded (pruned) architecture.

    The new tensors are uninitialised; load the weights afterwards.
    """
    modules = dict(model.named_modules())
    for name, d in diff.items():
        if name not in modules:
            raise RunDirError(f"model.json names module {name!r}, which the rebuilt model does not have")
        m = modules[name]
        for pname, shape in d.get("params", {}).items():
            old = m._parameters.get(pname)
            dtype = old.dtype if old is not None else _first_dtype(m)
            m._parameters[pname] = None if shape is None else nn.Parameter(
                torch.empty(shape, dtype=dtype), requires_grad=old.requires_grad if old is not None else True)
        for bname, shape in d.get("buffers", {}).items():
            old = m._buffers.get(bname)
            dtype = old.dtype if old is not None else _first_dtype(m)
            m._buffers[bname] = None if shape is None else torch.zeros(shape, dtype=dtype)
        _set_attrs(m, d.get("attrs", {}))
        if d.get("config"):
            _set_attrs(m.config, d["config"])
    return model


def _set_attrs(obj: Any, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        cur = getattr(obj, k, None)
        setattr(obj, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)


def _first_dtype(m: nn.Module) -> torch.dtype:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        return t.dtype
    return torch.get_default_dtype()


# ----------------------------------------------------------------------------------------------- the spec
@dataclass
class ModelSpec:
    """What rebuilds a model with no pickle: the dense architecture (``name``, ``constructor`` or a builder given
    at load), then ``apply_diff(modified)``. ``program`` instead names a self-contained ``torch.export`` file."""

    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    modified: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    constructor: str | None = None  # "module.path:ClassOrFunction"
    program: str | None = None  # a torch.export program file in the same folder (no rebuild)

    @property
    def label(self) -> str:
        """A short name for messages and titles."""
        return self.name or self.constructor or ("exported program" if self.program else "user-built model")

    def to_dict(self) -> dict[str, Any]:
        d = {"format": SPEC_FORMAT, "name": self.name, "kwargs": self.kwargs, "input": self.input,
             "modified": self.modified}
        extra = {"constructor": self.constructor, "program": self.program, "extra": self.extra}
        return {**d, **{k: v for k, v in extra.items() if v}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if d.get("format") != SPEC_FORMAT or not isinstance(d.get("name", ""), str):
            raise RunDirError(f"model.json has an unknown format (format={d.get('format')!r}, expected {SPEC_FORMAT})")
        return cls(name=d.get("name", ""), kwargs=d.get("kwargs", {}), input=d.get("input", {}),
                   modified=d.get("modified", {}), extra=d.get("extra", {}), constructor=d.get("constructor"),
                   program=d.get("program"))
