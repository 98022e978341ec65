"""Reconstruction of one block (see ``reconstruct``): capture its inputs and the dense model's outputs, then fit
its parameters with Adam on a cosine decay, keeping the best held-out state.

Steps, top to bottom: ``store_batches`` (the block's inputs in the pruned model and the dense block's outputs, on
CPU, within a memory budget), ``params_to_fit`` (the pruned layers' parameters, or the whole block's), ``fit_block``
(the optimisation loop with its held-out checks), ``sync_across_ranks`` (torchrun: one model on every rank).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from prunekit.batch import call_model, to_device
from prunekit.errors import PruningError

log = logging.getLogger(__name__)
HELD_OUT = 8  # one batch in this many is held out for the early stop
MEMORY_BUDGET = 2 << 30  # bytes of stored block inputs and targets per block (on CPU)


class _Stop(Exception):
    """Raised by a hook once the block's input/output is captured: the rest of the forward pass is not needed."""


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(out.to_tuple())
    raise PruningError(f"a block returned {type(out).__name__}, not a tensor: it cannot be reconstructed")


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, inputs: Any, want: str) -> Any:
    """The block's (args, kwargs) (``want="input"``) or its first output tensor (``"output"``) on one batch."""
    got: list[Any] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if want == "input":
            got.append((_detach(args), _detach(kwargs)))
            raise _Stop

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        got.append(_first_tensor(out).detach().to("cpu"))
        raise _Stop

    h = (block.register_forward_pre_hook(pre, with_kwargs=True) if want == "input"
         else block.register_forward_hook(post, with_kwargs=True))
    try:
        with contextlib.suppress(_Stop):
            call_model(model, inputs)
    finally:
        h.remove()
    if not got:
        raise PruningError("a block to reconstruct was not called by the model's forward pass on the calibration data")
    return got[0]


def _mask_of(x: Any, out: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` of a dict batch when it has the block output's (batch, sequence) shape."""
    m = x.get("attention_mask") if isinstance(x, dict) else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and out.dim() >= 2 and tuple(m.shape) == tuple(out.shape[:2]):
        return m.to("cpu").bool()
    return None


def _loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        return (pred[mask] - target[mask]).square().mean()
    return (pred - target).square().mean()


def _mix(pruned: Any, dense: Any, p: float, gen: torch.Generator) -> Any:
    """``pruned`` with each element of its floating tensors taken, with probability ``p``, from the same-shaped
    tensor at the same place in ``dense`` (other leaves: the pruned model's)."""
    if isinstance(pruned, torch.Tensor):
        if (pruned.is_floating_point() and isinstance(dense, torch.Tensor) and dense.shape == pruned.shape):
            return torch.where(torch.rand(pruned.shape, generator=gen) < p, dense, pruned)
        return pruned
    if isinstance(pruned, dict) and isinstance(dense, dict):
        return {k: _mix(v, dense.get(k), p, gen) for k, v in pruned.items()}
    if isinstance(pruned, (tuple, list)) and isinstance(dense, (tuple, list)) and len(dense) == len(pruned):
        return type(pruned)(_mix(a, b, p, gen) for a, b in zip(pruned, dense))
    return pruned


def sync_across_ranks(params: list[torch.Tensor]) -> None:
    """torchrun: every rank fitted the block on its own calibration batches; average the fitted weights so all ranks
    hold one model (and the next block's inputs agree); a no-op in one process."""
    from prunekit.distributed import all_reduce_mean, is_distributed

    if not is_distributed():
        return
    with torch.no_grad():
        for i, v in all_reduce_mean({f"{i:06d}": p for i, p in enumerate(params)}).items():
            params[int(i)].copy_(v)


def store_batches(model: nn.Module, dense: nn.Module, block: nn.Module, dense_block: nn.Module, name: str,
                  data: list[Any], n_val: int, input_mix: float) -> list[tuple] | None:
    """``(block input, dense target, mask, dense block input or None)`` per calibration batch, on CPU, until the
    memory budget is spent; ``None`` when the block's output lost channels (no dense target)."""
    stored: list[tuple] = []
    size = 0
    for x in data:
        inp = _capture(model, block, x, "input")
        target = _capture(dense, dense_block, x, "output")
        if not stored:
            shape = tuple(_capture(model, block, x, "output").shape)
            if shape != tuple(target.shape):
                log.warning("reconstruction skips %s: its output (%s) lost channels of the dense one (%s), so it "
                            "has no dense target (compensation only)", name, shape, tuple(target.shape))
                return None
        dense_inp = _capture(dense, dense_block, x, "input") if input_mix and len(stored) >= n_val else None
        size += _nbytes(inp) + _nbytes(target) + _nbytes(dense_inp)
        if size > MEMORY_BUDGET and len(stored) >= 2:
            log.warning("reconstruction of %s stores %d of %d batches (calibration and augmented; %.1f GiB budget "
                        "of block inputs and targets)", name, len(stored), len(data), MEMORY_BUDGET / 2**30)
            break
        stored.append((inp, target, _mask_of(x, target), dense_inp))
    return stored


def params_to_fit(model: nn.Module, block: nn.Module, name: str, layers: list[str], train: str) -> list[nn.Parameter]:
    """The floating parameters to fit: the block's pruned ``layers`` (``train="pruned"``) or all of it (``"block"``)."""
    mods = dict(model.named_modules())
    if train == "block":
        params = [p for p in block.parameters() if p.dtype.is_floating_point]
    else:
        params = [p for n in layers if n in mods for p in mods[n].parameters(recurse=False)
                  if p.dtype.is_floating_point]
    if not params:
        raise PruningError(f"block {name!r}: none of its pruned layers has parameters to reconstruct")
    return params


def _block_loss(block: nn.Module, batch: tuple, device: str | torch.device,
                mix: tuple[float, torch.Generator] | None = None) -> torch.Tensor:
    """Mean squared error of ``block`` against the dense target on one stored batch; ``mix`` = (share, generator)
    feeds part of the dense block input in (training steps only)."""
    (args, kwargs), target, mask, dense_inp = batch
    if mix is not None and dense_inp is not None:
        args, kwargs = _mix((args, kwargs), dense_inp, mix[0], mix[1])
    out = _first_tensor(block(*to_device(args, device), **to_device(kwargs, device)))
    return _loss(out, target.to(out.device), None if mask is None else mask.to(out.device))


def fit_block(model: nn.Module, block: nn.Module, params: list[nn.Parameter], val: list[tuple], fit: list[tuple], *,
              steps: int, lr: float, check_every: int, device: str | torch.device, seed: int,
              input_mix: float) -> tuple[float, float]:
    """Adam (each step relative to the parameter's RMS, cosine decay) on ``fit``; the parameters end at the state of
    the best held-out error on ``val``. Returns ``(held-out error before, best held-out error)``."""
    flags = [p.requires_grad for p in params]
    all_params = list(model.parameters())
    frozen = [p.requires_grad for p in all_params]
    mix = (input_mix, torch.Generator().manual_seed(seed + 2))

    @torch.no_grad()
    def held_out() -> float:
        return float(sum(float(_block_loss(block, b, device)) for b in val) / len(val))

    before = held_out()
    best, best_state = before, [p.detach().clone() for p in params]
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": [p], "lr": lr * max(float(p.detach().float().square().mean().sqrt()), 1e-8)}
                  for p in params]
        opt = torch.optim.Adam(groups)
        base = [g["lr"] for g in groups]
        gen = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for g, b0 in zip(opt.param_groups, base):
                g["lr"] = b0 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = _block_loss(block, fit[int(torch.randint(len(fit), (1,), generator=gen))], device, mix)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step + 1 == steps:
                v = held_out()
                if v < best:
                    best, best_state = v, [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, s in zip(params, best_state):
                p.copy_(s)
        for p, f in zip(all_params, frozen):
            p.requires_grad_(f)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return before, best


def reconstruct_block(model: nn.Module, dense: nn.Module, block: nn.Module, dense_block: nn.Module, name: str,
                      layers: list[str], data: list[Any], n_val: int, steps: int, lr: float, check_every: int,
                      device: str | torch.device, seed: int, train: str = "pruned",
                      input_mix: float = 0.0) -> dict[str, Any]:
    """Reconstruct one block; returns its record (see ``reconstruct``)."""
    t0 = time.perf_counter()
    stored = store_batches(model, dense, block, dense_block, name, data, n_val, input_mix)
    if stored is None:
        return {"block": name, "layers": layers, "batches": 0, "loss_before": None, "loss_after": None,
                "kept": "skipped: output pruned", "seconds": 0.0}
    n_val = min(n_val, max(1, len(stored) // HELD_OUT))  # fewer stored (memory budget): still 1 in 8 held out
    params = params_to_fit(model, block, name, layers, train)
    before, best = fit_block(model, block, params, stored[:n_val], stored[n_val:], steps=steps, lr=lr,
                             check_every=check_every, device=device, seed=seed, input_mix=input_mix)
    sync_across_ranks(params)
    kept = "reconstructed" if best < before else "compensated"
    rec = {"block": name, "layers": layers, "batches": len(stored), "loss_before": before, "loss_after": best,
           "kept": kept, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("reconstructed %s (%d layers, %d batches): held-out error %.4g -> %.4g%s", name, len(layers),
             len(stored), before, best, "" if kept == "reconstructed" else " (no gain: compensated weights kept)")
    return rec
