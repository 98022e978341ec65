"""Compensation of a consumer (``down_proj``, ``o_proj``) whose input features ``P`` are removed, keeping ``K``.

With ``x`` the consumer's input over the calibration tokens (mean ``mu``, covariance ``S``):

- ``mean``: ``b += W[:, P] @ mu_P`` (the removed features replaced by their means). Needs a bias.
- ``lstsq`` with a bias: ``W_K += D``, ``b += W_P mu_P - D mu_K`` with ``D = W_P S_PK (S_KK + lambda I)^-1``, the
  closed-form least-squares reproduction of ``W x + b`` from ``x_K`` (the formula of the structured engine's
  ``Compensator``, whose ``_regress`` it reuses).
- ``lstsq`` without a bias (the default for Llama / Mistral / Qwen2, whose ``down_proj`` / ``o_proj`` have none):
  the same with the uncentered second moment ``S + mu mu^T``, i.e. the least-squares fit of ``W x`` by ``W_K' x_K``
  alone (no intercept). What it cannot restore is recorded as ``intercept_lost``: the calibration output mean left
  uncorrected, ``||W_P mu_P - D mu_K||``, relative to the output RMS ``sqrt(tr(W (S + mu mu^T) W^T))``.

``ridge="auto"`` picks ``lambda`` (relative to ``mean(diag S_KK)``) among ``RIDGES`` by 2-fold cross-validation on
the two alternating halves of the calibration batches, measuring the held-out output error exactly:
``tr(M C_t M^T) + ||M (mu_t - mu_f)||^2`` for ``M = [W_P, -D]`` fitted on one half (``mu_f = 0`` without a bias),
and halves the winner for the full data.

Example:
    >>> rec = compensate(down_proj, stats, keep_idx, mode="lstsq", bias=True)   # before the columns are sliced
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.compensation import FALLBACK_RIDGE, RIDGES, _regress
from prunekit.pruning.structured.stats import ChannelStats

from .arch import ensure_bias, set_weight_oi, weight_oi

MODES = ("none", "mean", "lstsq")


def _second(st: ChannelStats, centered: bool) -> torch.Tensor:
    if st.cov is None:
        raise PruningError(f"lstsq compensation needs the covariance at {st.point or 'the consumer input'}")
    return st.cov if centered else st.cov + torch.outer(st.mean, st.mean)


def _auto_ridge(st: ChannelStats, W_P: torch.Tensor, P: torch.Tensor, K: torch.Tensor, centered: bool) -> float:
    if st.halves is None or any(h.cov is None for h in st.halves):
        return FALLBACK_RIDGE
    dev = W_P.device
    idx = torch.cat([P, K]).to(dev)
    err = torch.zeros(len(RIDGES), dtype=torch.float64)
    for fit, test in (st.halves, st.halves[::-1]):
        S_f = _second(fit, centered).to(dev)
        C_t = test.cov.to(dev)[idx][:, idx]
        mu_t = test.mean.to(dev)[idx]
        shift = mu_t - fit.mean.to(dev)[idx] if centered else mu_t
        for i, r in enumerate(RIDGES):
            D = _regress(S_f, W_P, P, K, r)  # (O, |K|)
            M = torch.cat([W_P, -D], 1)  # (O, |P| + |K|): residual W_P x_P - D x_K (minus the fitted bias)
            err[i] += ((M @ C_t) * M).sum() + (M @ shift).square().sum()
    return RIDGES[int(err.argmin())] / 2


@torch.no_grad()
def compensate(m: nn.Module, st: ChannelStats | None, keep: torch.Tensor, mode: str, *, bias: bool,
               ridge: float | str = "auto", name: str = "") -> dict[str, Any]:
    """Update ``m`` (weights in the original input order) for keeping input features ``keep`` only.

    ``bias``: whether ``m`` may carry a bias (created as zeros when missing). Returns a record with the norms of
    the bias and weight changes and the ridge used. Call before the columns are sliced.
    """
    if mode not in MODES:
        raise PruningError(f"compensate={mode!r}: choose one of {', '.join(MODES)}")
    rec: dict[str, Any] = {"name": name, "mode": mode}
    if mode == "none":
        return rec
    if st is None:
        raise PruningError(f"compensate={mode!r} on {name!r}: no statistics of its input were collected")
    W = weight_oi(m).detach().double()  # (O, D)
    D_in = W.shape[1]
    if st.channels != D_in:
        raise PruningError(f"statistics of {name!r} describe {st.channels} inputs, the layer has {D_in}")
    dev = W.device
    mask = torch.ones(D_in, dtype=torch.bool)
    mask[keep.cpu()] = False
    P, K = mask.nonzero().flatten(), keep.cpu().sort().values
    if len(P) == 0:
        return rec | {"channels": 0}
    mu = st.mean.to(dev)
    W_P = W[:, P.to(dev)]
    if mode == "mean":
        if not bias:
            raise PruningError(f"compensate='mean' on {name!r}: this model's config cannot express a bias on that "
                               f"layer, so the compensated model would not reload; use compensate='lstsq' or 'none'")
        delta = W_P @ mu[P.to(dev)]
    else:
        r = _auto_ridge(st, W_P, P, K, bias) if ridge == "auto" else float(ridge)
        S = _second(st, centered=bias).to(dev)
        D = _regress(S, W_P, P.to(dev), K.to(dev), r)  # (O, |K|)
        new_w = W.clone()
        new_w[:, K.to(dev)] += D
        set_weight_oi(m, new_w)
        shift = W_P @ mu[P.to(dev)] - D @ mu[K.to(dev)]  # (O,) the output mean an intercept would restore
        delta = shift if bias else None
        rec.update(weight_change=float(D.norm()), ridge=r)
        if not bias:
            rms = ((W @ _second(st, centered=False).to(dev)) * W).sum().clamp_min(1e-30).sqrt()
            rec["intercept_lost"] = float(shift.norm() / rms)
    if delta is not None:
        b = ensure_bias(m)
        b.add_(delta.to(b.dtype))
        rec["bias_change"] = float(delta.norm())
    return rec | {"channels": len(P)}
