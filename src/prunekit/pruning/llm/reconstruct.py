"""Block reconstruction for decoder width pruning: each pruned decoder layer fitted to the dense layer's output.

With ``reconstruct_steps > 0`` (:class:`~prunekit.pruning.llm.width.WidthSettings`), the dense model's hidden
states are carried along beside the pruned model's: before layer ``l`` is pruned, its dense weights map the dense
hidden state to the target; after it is pruned and compensated, its weight matrices take ``reconstruct_steps`` Adam
steps on the relative squared error between its output, given the inputs the *pruned* model produces at that layer,
and that target. The target being the dense model's own hidden state, the fit also corrects what the layers before
it lost (error-correcting, as in block-wise post-training methods). No labels, only the calibration text; the other
layers are not touched.

Memory: three sets of hidden states on the calibration tokens (the dense one, the pruned layer's inputs and the
targets: ``3 x tokens x hidden`` floats) plus one layer's activations for backward.

Example:
    >>> prune_width(model, calib_ids, mlp_ratio=0.5, head_ratio=0.5, reconstruct_steps=200)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .carry import split_call
from .stats import _Stop, run_batches  # the package's one "stop the forward pass here" signal

log = logging.getLogger(__name__)


def _out(o: Any) -> torch.Tensor:
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def dense_targets(layer: nn.Module, dense_in: list[torch.Tensor], runs: list[tuple[torch.Tensor, dict]]
                  ) -> list[torch.Tensor]:
    """``layer`` (still dense) applied to the dense model's hidden states, with each batch's keyword arguments."""
    was_training = layer.training
    layer.eval()
    try:
        return [_out(layer(h, **kw)).detach() for h, (_, kw) in zip(dense_in, runs)]
    finally:
        layer.train(was_training)


@torch.no_grad()
def layer_inputs(lm: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments ``layer`` receives on each calibration batch (forward cut there)."""
    runs: list[tuple[torch.Tensor, dict]] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        runs.append(split_call(layer.forward, args, kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(lm.parameters()).device
    try:
        run_batches(lm, batches, device)
    finally:
        handle.remove()
    return runs


def fit_layer(layer: nn.Module, runs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor], steps: int,
              lr: float, name: str = "") -> dict[str, float]:
    """Fit ``layer``'s weight matrices to ``targets``; returns the relative error before and after.

    ``steps`` Adam steps (cosine schedule) on ``||layer(h) - target||^2 / ||target||^2``, one calibration batch per
    step in turn. The learning rate is relative: each matrix moves by about ``lr`` times its own RMS per step, so
    the same value suits models whose weights differ in scale; norms and biases stay as they are. A fit that does
    not lower the error is retried once at a quarter of the rate, then dropped (the layer stays as compensated).
    """
    def error() -> float:
        with torch.no_grad():
            num = sum(float((_out(layer(h, **kw)) - t).square().sum()) for (h, kw), t in zip(runs, targets))
        return num / max(sum(float(t.square().sum()) for t in targets), 1e-30)

    was_training = layer.training
    layer.eval()  # dropout off: the fit is to the model's inference output
    saved = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    before = after = error()
    try:
        for rate in (lr, lr / 4):
            _adam(layer, runs, targets, steps, rate)
            after = error()
            if after < before:
                break
            log.warning("%s: reconstruction at lr %g raised the error %.4f -> %.4f", name or "layer", rate, before,
                        after)
            layer.load_state_dict(saved)
            after = before
    finally:
        layer.train(was_training)
    log.info("%s reconstructed: relative error %.4f -> %.4f (%d steps)", name or "layer", before, after, steps)
    return {"reconstruct_error_before": before, "reconstruct_error_after": after}


def _adam(layer: nn.Module, runs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor], steps: int,
          lr: float) -> None:
    params = [p for p in layer.parameters() if p.is_floating_point() and p.ndim >= 2]
    flags = [p.requires_grad for p in params]
    groups = [{"params": [p], "lr": lr * float(p.detach().float().square().mean().sqrt().clamp_min(1e-8))}
              for p in params]
    base = [g["lr"] for g in groups]
    opt = torch.optim.Adam(groups)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for step in range(steps):
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / steps))
                (h, kw), t = runs[step % len(runs)], targets[step % len(runs)]
                loss = (_out(layer(h, **kw)) - t).square().sum() / t.square().sum().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
