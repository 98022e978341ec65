"""Calibration statistics of decoder layers, gathered with forward-pre hooks (no activations are stored).

:func:`collect_inputs` runs calibration batches of token ids through a causal LM and accumulates, for each named
projection, the float64 moments of its input features (mean, variance, and with ``covariance`` the covariance and two
alternating halves for the cross-validated ridge of ``lstsq``), reusing the accumulator of the structured engine
(``prunekit.pruning.structured.stats``). Memory is the moments only: ``D`` floats per point, ``D^2`` with covariance.

With ``stop_after`` the forward pass is cut short (by an exception caught here) once that module has seen its input:
sequential pruning collects layer ``l``'s statistics at the cost of running layers ``0..l`` only.

Example:
    >>> down = "model.layers.0.mlp.down_proj"
    >>> st = collect_inputs(model, batches, [down], covariance=[down])
    >>> st["model.layers.0.mlp.down_proj"].var.shape      # (intermediate_size,)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.stats import ChannelStats, _Accumulator

from .arch import in_features

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def run_batches(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device | str) -> None:
    """Each batch of token ids through ``model`` (no cache); a hook's ``_Stop`` ends that batch's pass there."""
    for b in batches:
        try:
            model(input_ids=b.to(device), use_cache=False)
        except _Stop:
            pass


def calibration_batches(calib: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
    """Calibration token ids as a list of ``(B, T)`` long tensors: a ``(N, T)`` tensor is cut into batches."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 2:
            raise ConfigError(f"calibration data: expected token ids of shape (N, T); got {tuple(calib.shape)}")
        batches = list(calib.long().split(batch_size))
    else:
        batches = [torch.as_tensor(b).long() for b in calib]
    if not batches or sum(b.numel() for b in batches) == 0:
        raise PruningError("calibration data is empty: pass token ids of shape (N, T) with N >= 1")
    for b in batches:
        if b.ndim != 2:
            raise ConfigError(f"calibration data: every batch must be (B, T) token ids; got {tuple(b.shape)}")
    return batches


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: Sequence[torch.Tensor], names: Iterable[str], *,
                   covariance: Iterable[str] = (), stop_after: str | None = None) -> dict[str, ChannelStats]:
    """Moments of the input features of the modules ``names`` over all calibration tokens.

    Args:
        model: a transformers causal LM (called as ``model(input_ids=...)``).
        batches: ``(B, T)`` token-id tensors (:func:`calibration_batches`).
        names: module names whose inputs to measure.
        covariance: the subset of ``names`` that also needs the covariance (``lstsq``).
        stop_after: cut each forward pass once this module has been reached (sequential pruning).
    """
    modules = dict(model.named_modules())
    names, cov = list(dict.fromkeys(names)), set(covariance)
    missing = [n for n in [*names, *([stop_after] if stop_after else [])] if n not in modules]
    if missing:
        raise PruningError(f"statistics: the model has no module {missing[0]!r}")
    accs = {n: _Accumulator(in_features(modules[n]), n in cov, f"input of {n}") for n in names}
    handles = []

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            accs[name].update(args[0], -1, None)
            if name == stop_after:
                raise _Stop

        return hook

    def stop(*_: object) -> None:
        raise _Stop

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(make_hook(n)))
    if stop_after and stop_after not in accs:
        handles.append(modules[stop_after].register_forward_pre_hook(stop))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        run_batches(model, batches, device)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {n: a.result() for n, a in accs.items()}
    for n, s in out.items():
        if s.count == 0:
            raise PruningError(f"statistics: module {n!r} was never called by the forward pass")
    return out


def input_norm(st: ChannelStats) -> torch.Tensor:
    """``||x_i||_2`` over all calibration tokens, per input feature (Wanda's activation norm)."""
    return ((st.var + st.mean.square()) * st.count).sqrt()
