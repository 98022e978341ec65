"""The three one-shot sparsity criteria of :mod:`prunekit.pruning.llm.sparse`, each a small function of one weight
``W`` seen as ``(out, in)``: magnitude, Wanda (``|W| * ||X||``, per output row) and SparseGPT (OBS column by column
with the Cholesky factor of ``H^-1``; the kept weights absorb the error)."""

from __future__ import annotations

import logging

import torch

from prunekit.errors import PruningError
from prunekit.pruning.unstructured.patterns import nm_mask, prune_lowest

log = logging.getLogger(__name__)


def magnitude_mask(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of ``w`` (out, in) by ``|w|``: the whole layer ranked at once, or N:M groups."""
    if nm is not None:
        return nm_mask(w.abs(), *nm)
    return prune_lowest(w.abs(), round(sparsity * w.numel()))


def row_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask with the ``k`` lowest scores of every row removed (stable: lower column index first on ties)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.argsort(scores.float(), dim=1, stable=True)[:, :k], False)
    return keep


def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``: ``sq_norm[j] = sum_t x_tj^2`` over the calibration tokens."""
    return w.abs().float() * sq_norm.float().clamp_min(0).sqrt()[None, :]


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's keep-mask of ``w`` (out, in): per output row, or N:M groups along the input."""
    scores = wanda_scores(w, sq_norm)
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_lowest(scores, round(sparsity * w.shape[1]))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` with ``lambda = damp * mean(diag H)``; the damping grows
    tenfold (with a warning) until the factorisation succeeds."""
    scale = float(torch.diag(h).mean()) or 1.0
    for attempt in range(6):
        lam = damp * 10**attempt * scale
        damped = h.clone()  # H + lambda I, without an (in, in) identity: at most four (in, in) matrices at once
        damped.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("sparsegpt: Hessian needed damping %.3g (x%d of the asked one) to factorise",
                                damp * 10**attempt, 10**attempt)
                return u
    raise PruningError("sparsegpt: the input Hessian X^T X is not positive definite even with 1e5 times the asked "
                       "damping; give more calibration tokens or a larger damp")


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight ``w`` (out, in) with input Hessian ``h`` (in, in) = ``sum_t x_t x_t^T``.

    Columns are visited left to right in blocks of ``blocksize``; within a block each column's pruned weights are
    zeroed and their error ``(w - q) / [U]_jj`` is spread over the later columns through the row ``U[j, j:]`` of the
    upper Cholesky factor ``U`` of ``H^-1`` (the OBS update); after a block its accumulated error updates all later
    columns at once. Returns the new weight (float32, pruned entries exactly zero) and the keep-mask.
    """
    rows, cols = w.shape
    if nm is not None and blocksize % nm[1]:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: any weight there is free to prune
    h[dead, dead] = 1.0
    u = _inverse_cholesky(h, damp)
    del h  # (in, in): not needed past the factor
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    total, pruned = w.numel(), 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d1 = torch.diag(u1)  # (count,)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = pruned
        if nm is None:  # adaptive mask of this block: lowest w^2 / d^2 over all its rows, cumulative count exact
            n_here = round(sparsity * rows * i2) - pruned
            mask1 = ~prune_lowest(w1.pow(2) / d1.pow(2)[None, :], n_here)
            pruned += n_here
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i:i + m].pow(2) / d1[i:i + m].pow(2)[None, :]
                mask1[:, i:i + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / d1[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]  # OBS: the remaining columns absorb the error
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if nm is None and pruned != round(sparsity * total):  # cannot happen: the cumulative counts end at the total
        raise PruningError(f"sparsegpt: pruned {pruned} weights instead of {round(sparsity * total)}")
    w.mul_(keep)
    return w, keep

