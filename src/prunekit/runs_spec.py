"""The model half of a run directory: how ``model.json`` rebuilds the dense architecture (the spec itself and the
layer diff live in ``prunekit.models.spec``).

A pruned model is rebuilt with no pickle: the dense architecture is built again from ``model.json``, then the
shapes and attributes of every module that differs from it (the *layer diff*, ``modified``) are applied, then the
weights are loaded strictly from ``model.safetensors``. The dense architecture comes from one of::

    name         a registry name: prunekit.create_model(name, **kwargs)       (tv:resnet18, timm:..., resnet20)
    constructor  an importable callable "module.path:ClassOrFunction", called with the JSON ``kwargs``
    builder      nothing recorded: the caller passes load_model(path, builder=callable) (called with ``kwargs``)

Hugging Face models keep their architecture in ``model.config``: its scalar fields that differ are part of the diff.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, RunDirError
from prunekit.models.spec import SPEC_FORMAT, ModelSpec, apply_diff, module_diff  # noqa: F401  (re-exported)
from prunekit.registry import import_object

WEIGHTS, SPEC, PROGRAM = "model.safetensors", "model.json", "model.pt2"
REBUILD_WAYS = ("save it with save_model(..., constructor='module.path:ClassOrFunction', kwargs={...}) (a class or "
                "function importable in a fresh process), pass load_model(..., builder=callable) returning the "
                "dense model, or build it with prunekit.create_model(name) (a registry name)")


def import_constructor(path: str) -> Callable[..., nn.Module]:
    """The callable named by ``"module.path:ClassOrFunction"`` (a dotted attribute path after the colon)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"constructor={path!r}: expected 'module.path:ClassOrFunction' (e.g. "
                          "'torchvision.models:resnet18' or 'mypkg.nets:UNet')")
    try:
        obj: Any = import_object(path)
    except (ImportError, AttributeError) as e:
        raise RunDirError(f"constructor {path!r} cannot be imported ({type(e).__name__}: {e}); make it importable "
                          f"(on PYTHONPATH), or {REBUILD_WAYS}") from None
    if not callable(obj):
        raise ConfigError(f"constructor={path!r} is not callable")
    return obj


def constructor_path(obj: Any) -> str | None:
    """``"module:QualName"`` of a class or function that a fresh process can import, else ``None``."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if found is obj else None


def no_required_args(cls: type) -> bool:
    """``cls()`` needs no argument (so its spec can record empty kwargs)."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def check_json(kwargs: dict[str, Any], what: str = "kwargs") -> dict[str, Any]:
    """``kwargs`` if it round-trips through JSON (tuples become lists), else a ``ConfigError`` naming the key."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{what} must be a dict of JSON values, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}[{k!r}] = {type(v).__name__} is not a JSON value (str, number, bool, None, "
                              "list, dict); build it inside a constructor function and pass plain values") from None
    return json.loads(json.dumps(kwargs))


def rebuild(spec: ModelSpec, builder: Callable[..., nn.Module] | None = None) -> nn.Module:
    """The dense model of ``spec`` (random weights): ``builder(**kwargs)``, ``create_model(name, **kwargs)`` or
    the constructor's ``(**kwargs)``, whichever is given first."""
    if builder is not None:
        model = builder(**spec.kwargs)
    elif spec.name:
        from prunekit.models import create_model

        model = create_model(spec.name, **{**spec.kwargs, "pretrained": False})
    elif spec.constructor:
        model = import_constructor(spec.constructor)(**spec.kwargs)
    else:
        raise RunDirError(f"this model.json records no way to rebuild the model's architecture: {REBUILD_WAYS}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"builder/constructor of {spec.label!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_reference(spec: ModelSpec, builder: Callable[..., nn.Module] | None = None) -> nn.Module | None:
    """The freshly built (unpruned, random) model for ``spec``, on the meta device when possible (cheap)."""
    if spec.name:
        spec = ModelSpec(name=spec.name, kwargs={**spec.kwargs, "pretrained": False})
    try:
        with torch.device("meta"):
            return rebuild(spec, builder)
    except Exception:  # some constructors do real tensor work; fall back to a CPU build
        try:
            return rebuild(spec, builder)
        except Exception:
            return None


def make_spec(model: nn.Module, name: str, kwargs: dict[str, Any], input_spec: dict[str, Any],
              extra: dict[str, Any] | None = None) -> ModelSpec:
    """A registry-name spec of ``model`` with its layer diff against a fresh build."""
    spec = ModelSpec(name=name, kwargs=dict(kwargs), input=dict(input_spec), extra=dict(extra or {}))
    spec.modified = module_diff(model, build_reference(spec))
    return spec


def read_spec(run_dir: str | Path) -> ModelSpec:
    """The ``model.json`` of a run directory (or a folder written by ``save_model``)."""
    p = Path(run_dir) / SPEC
    if not Path(run_dir).is_dir():
        raise RunDirError(not_a_dir(run_dir))
    if not p.is_file():
        raise RunDirError(f"{str(run_dir)!r} is not a run directory: it has no {SPEC}")
    try:
        return ModelSpec.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p} is corrupt: {e}") from None


def not_a_dir(run_dir: str | Path) -> str:
    if Path(run_dir).exists():
        return f"{str(run_dir)!r} is a file, not a run directory (give the folder that holds {SPEC} and {WEIGHTS})"
    return f"run directory {str(run_dir)!r} does not exist"


def example_inputs(spec: ModelSpec, batch_size: int = 1, device: str | torch.device = "cpu",
                   seed: int = 0) -> Any:
    """Example inputs matching ``spec.input``: an image batch, or a dict of token tensors for text models."""
    inp = spec.input
    g = torch.Generator().manual_seed(seed)
    if inp.get("kind", "image") == "text":
        seq = int(inp.get("seq_len", 32))
        ids = torch.randint(0, int(inp.get("vocab_size", 1000)), (batch_size, seq), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    shape = list(inp.get("shape", [1, 3, 224, 224]))
    return torch.randn([batch_size, *shape[1:]], generator=g).to(device)


def input_spec_of(example: Any) -> dict[str, Any]:
    """``spec.input`` recorded from a user's example input: an image-like tensor's shape, else ``{}``."""
    if isinstance(example, torch.Tensor) and example.dtype.is_floating_point:
        return {"kind": "image", "shape": [1, *example.shape[1:]]}
    return {}
