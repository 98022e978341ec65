"""Which layers are sparsified: convolutions and linear layers, chosen by name regex, first and last left dense.

The first layer (it sees the raw input, has few weights and is very sensitive) and the classifier (the last layer to
run) are left dense by default, as in most unstructured-pruning papers (Han et al. 2015; Zhu & Gupta 2017; Gale et
al. 2019). "First" and "last" are found by running the model once on example inputs and recording the order in which
the prunable layers execute; without example inputs the registration order is used (and said so).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError, compile_patterns
from prunekit.measure.macs import call_model

log = logging.getLogger(__name__)

PRUNABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerSelection:
    """The layers to sparsify (``layers``, in execution order), the ones left out and why, and per-layer MACs."""

    layers: dict[str, nn.Module]
    skipped: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every prunable layer, in execution order
    macs: dict[str, int] = field(default_factory=dict)  # per-sample MACs of each prunable layer (when traced)


def is_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def gemm_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear-like layer as ``(out, in)`` (a view: for a ``Conv1D`` its transpose)."""
    return module.weight.t() if is_transposed(module) else module.weight


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution / linear layer with a weight parameter, in registration order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, PRUNABLE) and isinstance(m._parameters.get("weight"), torch.Tensor)}


@torch.no_grad()
def execution_order(model: nn.Module, example_inputs: Any,
                    layers: dict[str, nn.Module]) -> tuple[list[str], dict[str, int]]:
    """Names of ``layers`` in the order they first run on ``example_inputs``, and their per-sample MACs."""
    order: list[str] = []
    macs: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if name not in macs:
                order.append(name)
                macs[name] = 0
            # MACs of a conv / linear: every output element costs one dot product of fan-in weights
            if isinstance(out, torch.Tensor):
                batch = out.shape[0] if out.dim() > 1 else 1
                macs[name] += out.numel() // max(1, batch) * m.weight[0].numel()

        return hook

    for name, m in layers.items():
        handles.append(m.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order, macs


def select_layers(model: nn.Module, only: Sequence[str] = (), ignore: Sequence[str] = (),
                  dense_first_last: bool = True, example_inputs: Any = None) -> LayerSelection:
    """The layers to sparsify: prunable layers whose name matches an ``only`` regex (all when empty) and no
    ``ignore`` regex (``re.search``), without the first layer and the classifier unless ``dense_first_last=False``.

    Example:
        >>> select_layers(model, ignore=[r"downsample"], example_inputs=torch.randn(1, 3, 32, 32)).layers.keys()
    """
    only_re, ignore_re = compile_patterns(only, "--only"), compile_patterns(ignore, "--ignore")
    candidates = prunable_layers(model)
    if not candidates:
        raise PruningError(f"{type(model).__name__} has no convolution or linear layer to sparsify")
    if example_inputs is not None:
        order, macs = execution_order(model, example_inputs, candidates)
        unused = [n for n in candidates if n not in macs]
        order_known = True
    else:
        order, macs, unused, order_known = list(candidates), {}, [], False
    skipped: dict[str, str] = {n: "does not run in the forward pass" for n in unused}
    if dense_first_last and order:
        how = "execution" if order_known else "registration (no example inputs given)"
        skipped.setdefault(order[0], f"first layer, kept dense by default ({how} order)")
        if len(order) > 1:
            skipped.setdefault(order[-1], f"last layer (classifier), kept dense by default ({how} order)")
    for pat in only_re:
        if not any(pat.search(n) for n in candidates):
            raise ConfigError(f"--only {pat.pattern!r} matches no prunable layer; layers are: "
                              f"{', '.join(list(candidates)[:12])}{' ...' if len(candidates) > 12 else ''}")
    layers: dict[str, nn.Module] = {}
    for name in order + unused:
        if name in skipped:
            continue
        if only_re and not any(p.search(name) for p in only_re):
            skipped[name] = "not matched by --only"
        elif any(p.search(name) for p in ignore_re):
            skipped[name] = "matched by --ignore"
        else:
            layers[name] = candidates[name]
    if not layers:
        raise PruningError("no layer left to sparsify after --only/--ignore and the dense first/last layers: "
                           + "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:8]))
    return LayerSelection(layers=layers, skipped=skipped, order=order, macs=macs)
