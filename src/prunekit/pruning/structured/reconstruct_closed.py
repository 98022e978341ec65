"""Closed-form, error-correcting refit of the layers that read pruned channels: the quick relative of ``reconstruct``.

``lstsq`` compensation refits each consumer on the *dense* model's input statistics, and only reproduces the
consumer's own dense output. After pruning, two errors are left that it cannot see: the consumer's input has moved
(earlier pruned blocks changed it), and the residual stream that the consumer's output is added to carries the error of
every earlier block. For a consumer ``c`` (a ``Linear`` that lost input features) inside a block, this refit takes the
*merge point* ``m``: the first ``LayerNorm`` of the block run after ``c`` whose input has ``c``'s output shape (a
post-norm transformer layer: ``LN(h + W x + b)``), else the block's output. With, over the calibration tokens,

    x_p: c's input in the pruned model (every earlier block already refit),  y_p = W x_p + b: its output,
    z_p, z_d: the merge point's input in the pruned and in the dense model,

the target ``t = y_p + (z_d - z_p)`` is what ``c`` must output for the merge point to see the dense model's value
(``z = c(x) + r`` with ``r`` not depending on ``c``), and ``W, b`` become the ridge least-squares fit of ``t`` on
``x_p``: one linear solve per layer, in forward order. The ridge (``RIDGE`` times the mean variance of the inputs)
pulls ``W`` towards its current (compensated) value, not towards 0: with a few thousand tokens for ~1 000 inputs the
fit must not forget what compensation knew. A norm divides each token by its standard deviation, so with
``weight="norm"`` each token's error is weighted by ``1 / Var(z_d)`` over its features (the error the norm's output
sees). This is OBC / SparseGPT's sequential, error-correcting setting solved in closed form for the last linear map
of each block (the map through the nonlinearity is left to ``reconstruct``). Cost: one dense forward pass and, per
block, one pruned forward pass up to it. On MiniLM-L6 (keep 0.5, 300 sentences) it adds +0.004 to +0.006 of mean
cosine in about a minute on one core, as much as 800 steps of ``reconstruct`` at that size
(``benchmarks/minilm_calib.py``, docs/benchmarks/minilm-calibration.md).

Example:
    >>> dense = copy.deepcopy(model)
    >>> report = prune(model, example, "variance_conditional", ratio=0.5, calib_data=batches, compensate="lstsq")
    >>> refit_consumers(model, dense, batches, consumers_of(model, report.groups))
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.batch import call_model, split_batch, to_device
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.reconstruct import _forward_order, blocks_of
from prunekit.pruning.structured.reconstruct_block import _first_tensor, _mask_of, _Stop

log = logging.getLogger(__name__)
RIDGE = 1.0  # relative to the mean input variance, towards the current weights (chosen on a validation split)
WEIGHTS = ("norm", "none")


def consumers_of(model: nn.Module, groups: Sequence[Any]) -> dict[str, list[str]]:
    """Block name -> the ``Linear`` layers inside it that lost input features (the groups' ``consumers``)."""
    named = dict(model.named_modules())
    wanted = {c for g in groups for c in g.consumers if isinstance(named.get(c), nn.Linear)}
    out = {}
    for block, layers in blocks_of(model, groups).items():
        inside = [n for n in layers if n in wanted]
        if inside:
            out[block] = inside
    return out


class _Sums:
    """Float64 sums over tokens of ``x`` (D), ``t`` (O): count, means, ``x x^T``, ``x t^T`` and ``||t||^2``."""

    def __init__(self, d: int, o: int):
        self.n, self.w = 0, 0.0  # rows, their total weight
        self.sx, self.st = torch.zeros(d, dtype=torch.float64), torch.zeros(o, dtype=torch.float64)
        self.sxx = torch.zeros(d, d, dtype=torch.float64)
        self.sxt = torch.zeros(d, o, dtype=torch.float64)
        self.stt = 0.0

    def add(self, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (N, D) and ``t`` (N, O), each with weight ``w`` (N,) (default 1)."""
        x, t = x.double().cpu(), t.double().cpu()
        w = torch.ones(len(x), dtype=torch.float64) if w is None else w.double().cpu()
        self.n += x.shape[0]
        self.w += float(w.sum())
        self.sx += w @ x
        self.st += w @ t
        self.sxx += (x * w[:, None]).T @ x
        self.sxt += (x * w[:, None]).T @ t
        self.stt += float(w @ t.square().sum(1))

    def merged(self, other: _Sums) -> _Sums:
        out = _Sums(0, 0)
        out.n, out.w, out.sx, out.st = self.n + other.n, self.w + other.w, self.sx + other.sx, self.st + other.st
        out.sxx, out.sxt, out.stt = self.sxx + other.sxx, self.sxt + other.sxt, self.stt + other.stt
        return out

    def moments(self) -> tuple[torch.Tensor, ...]:
        """(mean x, mean t, cov xx, cov xt, E||t - mean t||^2): population moments."""
        n = max(self.w, 1e-12)
        mx, mt = self.sx / n, self.st / n
        return mx, mt, self.sxx / n - torch.outer(mx, mx), self.sxt / n - torch.outer(mx, mt), \
            self.stt / n - float(mt.square().sum())


def _error(B: torch.Tensor, b: torch.Tensor, test: tuple[torch.Tensor, ...]) -> float:
    """(Weighted) mean squared error of ``t ~ B^T x + b`` on the moments ``test`` (``B``: (D, O))."""
    mx, mt, cxx, cxt, ctt = test
    shift = mt - B.T @ mx - b
    return float(ctt - 2 * (B * cxt).sum() + (B * (cxx @ B)).sum() + shift.square().sum())


def _fit(m: tuple[torch.Tensor, ...], ridge: float, W0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``(B (D, O), b (O,))`` of ``t`` on ``x`` from moments, its ridge (relative to the mean variance of
    ``x``) pulling ``B`` towards the current weights ``W0^T`` rather than towards 0."""
    mx, mt, cxx, cxt, _ = m
    lam = ridge * float(cxx.diagonal().mean().clamp_min(1e-12))
    B = W0.T + torch.linalg.solve(cxx + lam * torch.eye(len(mx), dtype=cxx.dtype), cxt - cxx @ W0.T)
    return B, mt - B.T @ mx


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


@torch.no_grad()
def merge_point(model: nn.Module, block: str, layer: str, inputs: Any) -> str:
    """Where ``layer``'s output meets the rest of ``block``: the first norm of the block called after ``layer`` with
    an input of ``layer``'s output width, else the block itself (its output)."""
    named = dict(model.named_modules())
    width = named[layer].out_features
    calls: list[tuple[str, int]] = []  # (module name, last dim of its first input), in call order
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0].shape[-1] if args and torch.is_tensor(args[0]) else -1)))
        for n, m in named.items() if n.startswith(block + ".")]
    try:
        call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    names = [n for n, _ in calls]
    if layer not in names:
        raise PruningError(f"refit: {layer!r} is not called by the forward pass of its block {block!r}")
    after = calls[names.index(layer) + 1:]
    return next((n for n, w in after if w == width and _is_norm(named[n])), block)


@torch.no_grad()
def _captured(model: nn.Module, inputs: Any, at: str, block: str, layer: str | None) -> list[torch.Tensor]:
    """``[merge point input]`` (or the block output when ``at == block``), preceded by ``layer``'s input and output
    when ``layer`` is given; the forward pass stops there."""
    named, got = dict(model.named_modules()), {}

    def keep_io(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        got["x"], got["y"] = args[0], out

    def at_merge(_m: nn.Module, args: tuple, out: Any = None) -> None:
        got["z"] = _first_tensor(out) if at == block else args[0]
        raise _Stop

    hook = named[at].register_forward_hook if at == block else named[at].register_forward_pre_hook
    hooks = [hook(at_merge)]
    if layer is not None:
        hooks.append(named[layer].register_forward_hook(keep_io))
    try:
        with contextlib.suppress(_Stop):
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    if "z" not in got or (layer is not None and "x" not in got):
        raise PruningError(f"refit: the forward pass did not reach {at!r} (and {layer!r})")
    return [got["x"], got["y"], got["z"]] if layer is not None else [got["z"]]


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(N, C): the real tokens (``mask``) or every position."""
    return t[mask.to(t.device)] if mask is not None and t.dim() == 3 else t.reshape(-1, t.shape[-1])


@torch.no_grad()
def dense_points(dense: nn.Module, data: list[Any], points: dict[str, bool]) -> dict[str, list[torch.Tensor]]:
    """Point name -> its tensor on each batch in ``dense``, in one forward pass per batch (stopped after the last
    point): a norm's input (``points[name]`` False) or a block's first output (True)."""
    named, out = dict(dense.named_modules()), {p: [] for p in points}
    missing = [p for p in points if p not in named]
    if missing:
        raise PruningError(f"refit: {missing} of the pruned model are missing from the dense model")

    def grab(name: str, value: Any) -> None:
        out[name].append((_first_tensor(value) if points[name] else value[0]).detach().cpu())
        if all(len(v) == len(out[name]) for v in out.values()):
            raise _Stop

    hooks = [named[p].register_forward_hook(lambda _m, _a, o, p=p: grab(p, o)) if is_block
             else named[p].register_forward_pre_hook(lambda _m, a, p=p: grab(p, a)) for p, is_block in points.items()]
    try:
        for x in data:
            with contextlib.suppress(_Stop):
                call_model(dense, x)
    finally:
        for h in hooks:
            h.remove()
    if any(len(v) != len(data) for v in out.values()):
        raise PruningError("refit: the dense model's forward pass did not reach every block to refit")
    return out


def refit_layer(model: nn.Module, block: str, layer: str, at: str, data: list[Any], targets: list[torch.Tensor],
                ridge: float = 1.0, weight: str = "norm") -> dict[str, Any] | None:
    """Refit one consumer ``layer`` of ``block`` towards the dense model's values ``targets`` at its merge point
    ``at`` (one tensor per batch of ``data``; see the module docstring); returns its record, or ``None`` (nothing
    changed) where the merge point's width was pruned: the dense values there have other channels."""
    t0 = time.perf_counter()
    lin = dict(model.named_modules())[layer]
    sums = _Sums(lin.in_features, lin.out_features)
    for x, zd in zip(data, targets):
        xp, yp, zp = _captured(model, x, at, block, layer)
        if zd.shape != zp.shape:  # the residual stream was pruned (checked on the first batch, before any change)
            log.debug("refit of %s: %s sees %s in the pruned model but %s in the dense one", layer, at,
                      tuple(zp.shape), tuple(zd.shape))
            return None
        mask = _mask_of(x, zp)
        w = None
        if weight == "norm" and at != block:  # the norm divides each token by its std: weight its error by 1 / var
            w = 1.0 / _rows(zd, mask).double().var(-1, unbiased=False).clamp_min(1e-12)
        sums.add(_rows(xp, mask), _rows(yp + zd - zp, mask), w)  # t = y_p + (z_d - z_p)
    W0 = lin.weight.detach().double().cpu()
    b0 = lin.bias.detach().double().cpu() if lin.bias is not None else torch.zeros(lin.out_features,
                                                                                     dtype=torch.float64)
    m = sums.moments()
    B, b = _fit(m, ridge, W0)
    before, after = _error(W0.T, b0, m), _error(B, b, m)
    with torch.no_grad():
        lin.weight.copy_(B.T.to(lin.weight))
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.copy_(b.to(lin.bias))
    log.info("refit %s towards %s on %d tokens: calibration error %.4g -> %.4g", layer, at, sums.n, before, after)
    return {"block": block, "layer": layer, "merge": at, "tokens": sums.n, "error_before": before,
            "error_after": after, "seconds": round(time.perf_counter() - t0, 2)}


def refit_consumers(model: nn.Module, dense: nn.Module, calib_data: Iterable, layers: dict[str, list[str]], *,
                    max_batches: int = 50, device: str | torch.device = "cpu", ridge: float = RIDGE,
                    weight: str = "norm", asked: bool = True) -> list[dict[str, Any]]:
    """Refit every consumer of ``layers`` (``consumers_of``: block -> its ``Linear`` consumers) in forward order,
    towards ``dense`` (the model before pruning, same module names). Returns one record per layer: ``block``,
    ``layer``, ``merge`` (where its output is matched), ``tokens``, ``error_before`` / ``error_after`` (the
    (weighted) mean squared error of the target on the calibration tokens, per token), ``seconds``.

    Args:
        max_batches: calibration batches used (the dense model's merge-point inputs on them are kept in memory).
        ridge: > 0, relative to the mean variance of each layer's inputs, towards the current weights.
        weight: ``"norm"`` (each token's error divided by the variance of the dense merge-point input, when the
            merge point is a norm) or ``"none"``.
        asked: the caller asked for the refit (``refit=True``): layers that cannot be refitted are a warning; else
            (the default refit of ``compensate="lstsq"``) an info line.
    """
    if isinstance(ridge, str) or not ridge > 0:
        raise ConfigError(f"refit ridge={ridge!r} must be a number > 0 (relative to the inputs' mean variance)")
    if weight not in WEIGHTS:
        raise ConfigError(f"refit weight={weight!r} is not a choice; choose one of {', '.join(WEIGHTS)}")
    data = [to_device(split_batch(b)[0], device) for _, b in zip(range(max_batches), calib_data)]
    if not data:
        raise PruningError("refit got no calibration batches; pass calib_data")
    named = dict(model.named_modules())
    for name, lays in layers.items():
        bad = [n for n in lays if not isinstance(named.get(n), nn.Linear)]
        if bad:
            raise PruningError(f"refit: {bad} of block {name!r} are not Linear layers of the model")
    modes = {m: m.training for m in [*model.modules(), *dense.modules()]}
    model.eval()
    dense.eval()
    try:
        plan = [(b, n, merge_point(model, b, n, data[0]))  # blocks, and the layers inside each, in call order
                for b in _forward_order(model, data[0], [n for n in layers if n in named])
                for n in _forward_order(model, data[0], layers[b])]
        targets = dense_points(dense, data, {at: at == b for b, _, at in plan})
        records = [refit_layer(model, b, n, at, data, targets[at], ridge, weight) for b, n, at in plan]
    finally:
        for m, mode in modes.items():
            m.training = mode
    skipped = [n for (_, n, _), r in zip(plan, records) if r is None]
    if skipped:
        say = log.warning if asked else log.info
        say("refit: %d layer(s) kept as compensated, not refitted: the width of their block's output was pruned (the "
            "residual stream), so the dense model has no values of that width to match: %s", len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return [r for r in records if r is not None]
