"""Decoder layers run one at a time on carried hidden states, instead of a partial forward pass per layer.

Sequential pruning measures layer ``l`` on the inputs the already pruned layers ``< l`` produce. Cutting a forward
pass of the calibration set at layer ``l`` (``collect_inputs(..., stop_after=...)``) costs ``l`` layers each time,
``O(layers^2)`` in all (twice that when block reconstruction also needs the layer's inputs). Carrying the hidden
states instead costs one layer per step:

1. :func:`capture`: one pass through the model with every decoder layer made an identity (nothing is computed in
   the layers) records layer 0's inputs and each layer's keyword arguments per batch (they differ where layers
   differ: Qwen2 / Mistral sliding-window layers get their own attention mask). Positional arguments are turned
   into keywords by the layer's signature (GPT-2 passes its mask positionally), the cache is dropped.
2. :func:`layer_stats`: input moments of a layer's projections from running that layer alone on its inputs;
3. :func:`forward_runs`: the layer's outputs, the next layer's inputs.

Memory: the hidden states of the calibration tokens (``tokens x hidden``), kept on the model's device; the
in-memory width pruner uses this path when that is at most the model's own parameter bytes
(:func:`affordable`) and falls back to partial passes otherwise. The streaming functions always use it.

Example:
    >>> runs, kws = capture(lm, lm.model.layers, batches)
    >>> st = layer_stats(lm, lm.model.layers[0], runs, ["model.layers.0.mlp.down_proj"], [])
    >>> runs = with_kwargs(forward_runs(lm.model.layers[0], runs), kws[1])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError

from .arch import in_features
from .stats import _Stop, run_batches

Runs = list[tuple[torch.Tensor, dict[str, Any]]]  # per calibration batch: (hidden states (B, T, D), layer kwargs)
_DROPPED = ("cache", "past_key_values", "past_key_value", "layer_past", "use_cache")


def split_call(forward: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states, every other argument as a keyword) of one decoder-layer call; the cache is left out."""
    kw = dict(kwargs)
    if args:
        try:
            params = inspect.signature(forward).parameters
            bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):  # no usable signature: only the hidden states are positional
            params, bound = {}, {"hidden_states": args[0], **kwargs}
        kw = {}
        for name, value in bound.items():
            if name in params and params[name].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
    first = next(iter(kw)) if args else "hidden_states"
    h = kw.pop(first)
    return h.detach(), {k: v for k, v in kw.items() if k not in _DROPPED}


def capture(lm: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device | str | None = None
            ) -> tuple[Runs, list[list[dict[str, Any]]]]:
    """Layer 0's inputs per calibration batch and every layer's keyword arguments per batch (layers not run).

    Raises:
        PruningError: the model does not pass a layer's output on to the next layer as it is.
    """
    hidden: list[torch.Tensor] = []
    kws: list[list[dict[str, Any]]] = [[] for _ in layers]
    forwards = [layer.forward for layer in layers]

    def grab(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            h, kw = split_call(forwards[i], args, kwargs)
            if i == 0:
                hidden.append(h)
            elif h.shape != hidden[-1].shape:  # the model unpacked the identity's output as a tuple
                raise PruningError(f"{type(lm).__name__} does not pass a decoder layer's output on as it is; the "
                                   "layer-by-layer functions support llama, mistral and qwen2")
            kws[i].append(kw)
            if i == len(layers) - 1:
                raise _Stop  # the final norm and the LM head are not needed
        return fn

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:  # each layer passes its input on (the hooks above still see it)
        layer.forward = _identity
    device = device or next(lm.parameters()).device
    try:
        with torch.no_grad():
            run_batches(lm, batches, device)
    finally:
        for handle, layer in zip(handles, layers):
            handle.remove()
            del layer.forward
    return [(h, kws[0][j]) for j, h in enumerate(hidden)], kws


def _identity(*args: Any, **kwargs: Any) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_kwargs(runs: Runs, kws: list[dict[str, Any]]) -> Runs:
    """``runs`` with the keyword arguments of another layer (``kws``: one per batch)."""
    return [(h, kw) for (h, _), kw in zip(runs, kws, strict=True)]


def layer_stats(lm: nn.Module, layer: nn.Module, runs: Runs, names: list[str], cov: list[str]) -> dict:
    """Input moments of the modules ``names`` (covariance for ``cov``) over this layer's calibration inputs."""
    from prunekit.pruning.structured.stats import _Accumulator

    if not names:
        return {}
    mods = dict(lm.named_modules())
    accs = {n: _Accumulator(in_features(mods[n]), n in cov, f"input of {n}") for n in dict.fromkeys(names)}
    handles = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: accs[n].update(a[0], -1, None)) for n in accs]
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            for h, kw in runs:
                layer(h, **kw)
    finally:
        for hd in handles:
            hd.remove()
        layer.train(was_training)
    return {n: a.result() for n, a in accs.items()}


@torch.no_grad()
def forward_runs(layer: nn.Module, runs: Runs) -> Runs:
    """The layer's outputs on ``runs`` (the next layer's inputs; its keyword arguments still this layer's)."""
    was_training = layer.training
    layer.eval()
    try:
        out = [layer(h, **kw) for h, kw in runs]
    finally:
        layer.train(was_training)
    return [((o[0] if isinstance(o, tuple) else o).detach(), kw) for o, (_, kw) in zip(out, runs)]


def affordable(lm: nn.Module, batches: list[torch.Tensor], copies: int = 1) -> bool:
    """Whether ``copies`` sets of hidden states of the calibration tokens fit in the model's own parameter bytes."""
    params = sum(p.numel() * p.element_size() for p in lm.parameters())
    p = next(lm.parameters())
    hidden = int(getattr(lm.config, "hidden_size", 0) or getattr(lm.config, "n_embd", 0) or 0)
    tokens = sum(b.numel() for b in batches)
    return copies * tokens * hidden * p.element_size() <= params
