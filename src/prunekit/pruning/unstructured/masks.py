"""The one mask mechanism of unstructured pruning: a boolean ``weight_mask`` buffer on each sparsified layer.

A masked layer keeps its ordinary ``weight`` parameter (so state dicts, torch-pruning, export and optimizers see the
usual names) plus a buffer ``weight_mask`` (bool, the shape of the weight, True = kept). Three things keep the masked
weights at exactly zero whoever trains the model:

* ``set_mask`` zeroes them in place;
* a gradient hook on the weight multiplies its gradient by the mask, so SGD (momentum, Nesterov, weight decay) and
  Adam/AdamW leave a zero weight with a zero gradient exactly at zero;
* a forward pre-hook, in training mode only, re-zeroes any masked weight that moved (a stale momentum buffer from
  before the mask was set) and re-attaches the gradient hook where a copy of the model lost it (``deepcopy``).

Our own training phases also pass ``MaskKeeper`` (or the ``Sparsifier``) to the training loop, which re-applies the
masks after every optimizer step. The buffers are saved with the weights (``prunekit.runs.save_model``); the load
hook ``"sparsity"`` re-attaches the hooks when a run directory is loaded in a fresh process. ``fold_masks`` makes the
zeros permanent and removes buffers and hooks (``--permanent``).

This mechanism is not ``torch.nn.utils.prune`` (its ``weight_orig`` reparametrisation renames the parameter); a layer
already pruned that way is refused.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from prunekit.errors import PruningError
from prunekit.runs import register_load_hook

log = logging.getLogger(__name__)

MASK = "weight_mask"
SPEC_KEY = "sparsity"  # model.prunekit_spec.extra[SPEC_KEY]: what the load hook needs
_PRE_HOOK_ATTR = "_prunekit_mask_pre_hook"
_GRAD_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight Parameter -> its gradient-hook handle


# ----------------------------------------------------------------------------------------------- queries
def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The boolean keep-mask of ``module`` (True = kept), or None when it is not masked."""
    return module._buffers.get(MASK)


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that carries a mask, by qualified name."""
    return {n: m for n, m in model.named_modules() if get_mask(m) is not None}


# ----------------------------------------------------------------------------------------------- set / apply
def _check_layer(module: nn.Module, name: str = "") -> torch.Tensor:
    where = f" {name!r}" if name else ""
    if hasattr(module, "weight_orig"):
        raise PruningError(f"layer{where} is already pruned with torch.nn.utils.prune (it has weight_orig); call "
                           "torch.nn.utils.prune.remove(module, 'weight') first: prunekit uses its own masks")
    w = module._parameters.get("weight")
    if not isinstance(w, torch.Tensor):
        raise PruningError(f"layer{where} ({type(module).__name__}) has no weight parameter to mask")
    return w


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "") -> None:
    """Attach (or replace) the keep-mask of ``module`` and zero the masked weights.

    Example:
        >>> set_mask(model.fc, model.fc.weight.abs() > 0.01)
    """
    w = _check_layer(module, name)
    if mask.shape != w.shape:
        raise PruningError(f"mask of shape {tuple(mask.shape)} does not fit the weight {tuple(w.shape)} of "
                           f"{name or type(module).__name__}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    if get_mask(module) is None:
        module.register_buffer(MASK, mask.clone())
    else:
        module._buffers[MASK] = mask.clone()
    w.mul_(mask)
    _install_hooks(module)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight of ``model`` again (after an optimizer step, a weight load, ...)."""
    for m in masked_layers(model).values():
        m.weight.mul_(_checked_mask(m))


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of masked weights (the gradient hooks already do it; this covers gradients set by hand)."""
    for m in masked_layers(model).values():
        if m.weight.grad is not None:
            m.weight.grad.mul_(_checked_mask(m))


def _checked_mask(module: nn.Module) -> torch.Tensor:
    mask = get_mask(module)
    if mask.shape != module.weight.shape:
        raise PruningError(f"{MASK} of shape {tuple(mask.shape)} does not fit the weight {tuple(module.weight.shape)}"
                           f" of a {type(module).__name__}: the layer was pruned structurally after being sparsified; "
                           "fold the masks first (fold_masks / --permanent), or sparsify after structured pruning")
    return mask


# ----------------------------------------------------------------------------------------------- hooks
def _grad_hook(module_ref: weakref.ref) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        m = module_ref()
        mask = None if m is None else get_mask(m)
        if mask is None or mask.shape != grad.shape:
            return grad
        return grad * mask

    return hook


def _ensure_grad_hook(module: nn.Module) -> None:
    w = module.weight
    if w.requires_grad and w not in _GRAD_HOOKS:
        _GRAD_HOOKS[w] = w.register_hook(_grad_hook(weakref.ref(module)))


def _pre_hook(module: nn.Module, args: Any) -> None:
    """Training mode only: make sure the forward sees exactly-zero masked weights and their gradients are masked."""
    if not module.training or get_mask(module) is None:
        return
    _ensure_grad_hook(module)
    mask = _checked_mask(module)
    w = module.weight
    with torch.no_grad():
        if w.detach().masked_select(~mask).any():  # only write when needed (a write bumps the version counter)
            w.mul_(mask)


def _install_hooks(module: nn.Module) -> None:
    _ensure_grad_hook(module)
    if not any(h is _pre_hook for h in module._forward_pre_hooks.values()):
        setattr(module, _PRE_HOOK_ATTR, module.register_forward_pre_hook(_pre_hook))


def _remove_hooks(module: nn.Module) -> None:
    handle = _GRAD_HOOKS.pop(module.weight, None)
    if handle is not None:
        handle.remove()
    for key, h in list(module._forward_pre_hooks.items()):
        if h is _pre_hook:
            del module._forward_pre_hooks[key]
    module.__dict__.pop(_PRE_HOOK_ATTR, None)


# ----------------------------------------------------------------------------------------------- remove / fold
@torch.no_grad()
def fold_masks(model: nn.Module) -> int:
    """Make the sparsity permanent: zero the masked weights, drop the mask buffers and hooks.

    The model computes exactly what the masked model computed. Returns the number of layers folded.

    Example:
        >>> fold_masks(model)  # then save: a plain dense model whose pruned weights are zeros
    """
    layers = masked_layers(model)
    for m in layers.values():
        m.weight.mul_(_checked_mask(m))
        _remove_hooks(m)
        del m._buffers[MASK]
    spec = getattr(model, "prunekit_spec", None)
    if spec is not None and SPEC_KEY in spec.extra:
        spec.extra[SPEC_KEY] = {**spec.extra[SPEC_KEY], "permanent": True, "layers": []}
    return len(layers)


def remove_masks(model: nn.Module) -> int:
    """Drop masks and hooks and leave the weights as they are (the zeros stay, but nothing keeps them at zero)."""
    layers = masked_layers(model)
    for m in layers.values():
        _remove_hooks(m)
        del m._buffers[MASK]
    return len(layers)


class MaskKeeper:
    """Training-loop callback that keeps masked weights at exactly zero: their gradients are zeroed before the
    optimizer step and the weights re-zeroed after it (covers momentum left over from before a mask changed).

    Example:
        >>> prunekit.train.fit(model, train_dl, val_dl, settings, callbacks=[MaskKeeper()])
    """

    def on_before_optimizer_step(self, model: nn.Module, step: int) -> None:
        mask_gradients(model)

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        apply_masks(model)


# ----------------------------------------------------------------------------------------------- run directories
def record_in_spec(model: nn.Module, info: dict[str, Any]) -> None:
    """Put what the load hook needs into ``model.prunekit_spec.extra["sparsity"]`` (before ``save_model``)."""
    spec = getattr(model, "prunekit_spec", None)
    if spec is None:
        raise PruningError("this model has no prunekit_spec (it was not built by create_model/load_model), so its "
                           "masks cannot be recorded for loading; save it with runs.save_model(..., spec=...)")
    spec.extra[SPEC_KEY] = {**info, "layers": sorted(masked_layers(model)), "permanent": not masked_layers(model)}


@register_load_hook(SPEC_KEY)
def reattach_masks(model: nn.Module, info: dict[str, Any]) -> None:
    """Load hook: the mask buffers came back with the weights (as stored dtype); make them boolean and re-hook."""
    modules = dict(model.named_modules())
    for name in info.get("layers", []):
        m = modules.get(name)
        mask = None if m is None else get_mask(m)
        if mask is None:
            raise PruningError(f"model.json says layer {name!r} is sparsified but the loaded model has no "
                               f"{MASK} buffer there; the run directory is incomplete")
        set_mask(m, mask != 0, name)
    if info.get("layers"):
        log.info("sparsity: re-attached masks to %d layers (%s, sparsity %s)", len(info["layers"]),
                 info.get("method", "?"), info.get("sparsity", "?"))
