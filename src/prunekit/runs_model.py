"""``save_model`` / ``load_model`` for any ``nn.Module``: ``model.safetensors`` + ``model.json``, no pickle.

Example:
    >>> prunekit.save_model("out", pruned, constructor="mypkg.nets:UNet", kwargs={"width": 32})
    >>> model = prunekit.load_model("out")                       # a fresh process: rebuild, resize, load
    >>> prunekit.save_model("out2", pruned, builder=make_unet)   # nothing importable: pass the builder again
    >>> model = prunekit.load_model("out2", builder=make_unet)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit._io import atomic_write, atomic_write_json
from prunekit.errors import ConfigError, RunDirError
from prunekit.runs_spec import (
    REBUILD_WAYS,
    SPEC,
    WEIGHTS,
    ModelSpec,
    build_reference,
    check_json,
    constructor_path,
    input_spec_of,
    module_diff,
    no_required_args,
    read_spec,
    rebuild,
)
from prunekit.runs_spec import apply_diff as apply_diff

# spec.extra[key] -> fn(model, value), run by load_model after the weights are in (e.g. re-attach sparsity masks)
LOAD_HOOKS: dict[str, Any] = {}
# spec.extra[key] -> the module that registers its hook, imported on demand so that a bare ``load_model`` in a fresh
# process re-attaches what the run dir recorded (e.g. sparsity masks) without the caller importing anything else
HOOK_PROVIDERS: dict[str, str] = {"sparsity": "prunekit.pruning.unstructured.masks"}


def register_load_hook(key: str):
    """Register ``fn(model, spec.extra[key])`` to run in ``load_model`` after the weights are loaded."""

    def deco(fn):
        LOAD_HOOKS[key] = fn
        return fn

    return deco


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec attached to a model built by ``create_model`` / ``load_model`` (``model.prunekit_spec``)."""
    spec = getattr(model, "prunekit_spec", None)
    if spec is None:
        raise RunDirError(f"cannot save {type(model).__name__}: prunekit does not know how to rebuild its "
                          f"architecture; {REBUILD_WAYS}")
    return spec


def _base_spec(model: nn.Module, constructor: str | Callable[..., nn.Module] | None, builder: Any,
               kwargs: dict[str, Any] | None) -> ModelSpec:
    """Where the dense architecture comes from: an explicit constructor or builder, the spec attached by
    ``create_model`` / ``load_model``, or the model's own class when it is importable."""
    attached: ModelSpec | None = getattr(model, "prunekit_spec", None)
    extra = dict(attached.extra) if attached is not None else {}
    inp = dict(attached.input) if attached is not None else {}
    kw = check_json(kwargs or {}) if kwargs is not None else None
    if constructor is not None:
        path = constructor if isinstance(constructor, str) else constructor_path(constructor)
        if path is None:
            raise ConfigError(f"constructor={constructor!r} is not importable from a fresh process (defined in "
                              "__main__ or inside a function); move it to a module, or pass builder= instead")
        return ModelSpec(constructor=path, kwargs=kw or {}, input=inp, extra=extra)
    if builder is not None:
        return ModelSpec(kwargs=kw or {}, input=inp, extra=extra)
    if attached is not None and (attached.name or attached.constructor):
        return ModelSpec(name=attached.name, constructor=attached.constructor,
                         kwargs=dict(attached.kwargs) if kw is None else kw, input=inp, extra=extra)
    from prunekit.models.hf import is_transformers, transformers_spec

    if kw is None and is_transformers(model):  # the class and its dense config; the pruned fields restored at load
        kw, extra["hf_config"] = transformers_spec(model)
        return ModelSpec(constructor="prunekit.models.hf:from_config", kwargs=kw, input=inp, extra=extra)
    path = constructor_path(type(model))
    if path is not None and (kw is not None or no_required_args(type(model))):
        return ModelSpec(constructor=path, kwargs=kw or {}, input=inp, extra=extra)
    why = (f"its class {type(model).__name__} is not importable from a fresh process" if path is None else
           f"its class {path} needs constructor arguments (pass kwargs={{...}})")
    raise RunDirError(f"cannot save {type(model).__name__}: {why}; {REBUILD_WAYS}")


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec | None = None, *,
               constructor: str | Callable[..., nn.Module] | None = None, kwargs: dict[str, Any] | None = None,
               builder: Callable[..., nn.Module] | None = None, example_inputs: Any = None) -> ModelSpec:
    """Write ``model.safetensors`` and ``model.json`` (atomically) so that ``load_model`` rebuilds ``model``.

    The dense architecture is recorded as a registry name (models from ``create_model``), an importable
    ``constructor`` + JSON ``kwargs`` (the model's own class is used when importable), or nothing (``builder``:
    pass the same callable to ``load_model``); every layer whose shape or attributes differ from it (pruned layers)
    is recorded too.

    Args:
        path: the folder to write.
        model: any ``nn.Module``, pruned or not.
        spec: an explicit spec (registry name + kwargs); mostly for prunekit's own stages.
        constructor: ``"module.path:ClassOrFunction"`` (or the class/function itself) building the dense model.
        kwargs: JSON keyword arguments for the constructor or builder.
        builder: a callable returning the dense model; used here to find the pruned layers, not recorded.
        example_inputs: a model input; an image-like tensor's shape is recorded for later stages.

    Example:
        >>> prunekit.save_model("out", model, kwargs={"width": 16})   # model's class is importable
        >>> prunekit.load_model("out")
    """
    from safetensors.torch import save_model as st_save

    if spec is not None:
        base = spec
    else:
        base = _base_spec(model, constructor, builder, kwargs)
    if example_inputs is not None:
        base.input = input_spec_of(example_inputs) or base.input
    ref = build_reference(base, builder)
    if ref is None and builder is not None:
        try:  # again, for the reason
            builder(**base.kwargs)
            why = "it returned no model"
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        raise ConfigError(f"builder={builder!r} failed to build the dense model (called with kwargs={base.kwargs}): "
                          f"{why}")
    out = ModelSpec(name=base.name, kwargs=dict(base.kwargs), input=dict(base.input), extra=dict(base.extra),
                    constructor=base.constructor, modified=module_diff(model, ref))
    run_dir = Path(path)
    was_training = model.training
    atomic_write(run_dir / WEIGHTS, lambda tmp: st_save(model, tmp, metadata={"prunekit_spec": SPEC}))
    atomic_write_json(run_dir / SPEC, out.to_dict())
    model.train(was_training)
    model.prunekit_spec = out
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               builder: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Rebuild the model of a run directory (or a ``save_model`` folder) in this process: no pickle.

    The dense model is rebuilt (``builder(**kwargs)`` when given, else the recorded registry name or constructor),
    the recorded pruned shapes are applied, and the weights are loaded strictly. A folder written by
    ``save_exported`` is loaded as its ``torch.export`` program (no Python class needed).

    Example:
        >>> model = prunekit.load_model("runs/pruned")
    """
    spec = read_spec(path)
    if spec.program:
        return _load_program(Path(path) / spec.program, spec, device)
    w = Path(path) / WEIGHTS
    if not w.is_file():
        raise RunDirError(f"{str(path)!r} has no {WEIGHTS}")
    model = rebuild(spec, builder)
    _apply_and_load(model, spec, w, device)
    for key, value in spec.extra.get("hf_config", {}).items():  # a transformers config's pruned fields
        setattr(model.config, key, value)
    for key, value in spec.extra.items():
        if key not in LOAD_HOOKS and key in HOOK_PROVIDERS:
            importlib.import_module(HOOK_PROVIDERS[key])
        if key in LOAD_HOOKS:
            LOAD_HOOKS[key](model, value)
    model.to(device)
    model.eval()
    model.prunekit_spec = spec
    return model


def _apply_and_load(model: nn.Module, spec: ModelSpec, weights: Path, device: str | torch.device) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load

    apply_diff(model, spec.modified)
    try:
        missing, unexpected = st_load(model, weights, strict=False, device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        from prunekit.models.weights import file_mismatch

        shapes = file_mismatch(model, weights)  # one line, not one line per key
        raise RunDirError(f"{weights} does not match model.json: {shapes}" if shapes else
                          f"{weights} is corrupt or does not match model.json: {e}") from None
    if missing or unexpected:
        raise RunDirError(f"{weights} does not match model.json: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")


def _load_program(file: Path, spec: ModelSpec, device: str | torch.device) -> nn.Module:
    """The module of a ``torch.export`` program (``torch.export.load``: no pickle, no Python class)."""
    import warnings

    if not file.is_file():
        raise RunDirError(f"model.json names the program {file.name!r}, which {str(file.parent)!r} does not hold")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.export.load(str(file)).module()
        except Exception as e:
            raise RunDirError(f"{file} is not a loadable torch.export program: {type(e).__name__}: {e}") from None
    module.to(device)
    module.prunekit_spec = spec
    return module
