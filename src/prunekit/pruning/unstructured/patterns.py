"""Mask builders: from per-weight (or per-kernel) scores to boolean keep-masks (True = kept).

Every builder is exact: ``round(sparsity * n)`` entries are removed (ties broken by position, stably), so the
reached sparsity is the asked one to within one weight per layer (per model for the global ranking).

Weight layouts: a linear weight is ``(out, in)``; a convolution weight is ``(out, in / groups, *kernel)``.
For N:M the groups of M run along the input dimension of the GEMM the layer becomes. For a convolution that is the
input channels at each (output channel, kernel position), the layout NVIDIA's sparse tensor cores and ASP use
(the weight seen as ``(out, *kernel, in)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunekit.errors import PruningError


# ----------------------------------------------------------------------------------------------- element-wise
def _check_finite(scores: torch.Tensor, what: str) -> None:
    if torch.isnan(scores).any():
        raise PruningError(f"{what}: the scores contain NaN (did the calibration loss diverge?)")


def prune_lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask of ``scores``' shape with the ``n_prune`` lowest scores removed (stable: earlier index first)."""
    flat = scores.detach().flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune > 0:
        keep[torch.argsort(flat.float(), stable=True)[:n_prune]] = False
    return keep.view(scores.shape)


def layer_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Each layer to ``sparsity``: ``round(sparsity * numel)`` lowest scores removed per layer.

    Example:
        >>> layer_masks({"fc": torch.tensor([[3., 1.], [2., 4.]])}, 0.5)["fc"]
        tensor([[ True, False],
                [False,  True]])
    """
    out = {}
    for name, s in scores.items():
        _check_finite(s, name)
        out[name] = prune_lowest(s, round(sparsity * s.numel()))
    return out


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking over all layers: the ``round(sparsity * total)`` lowest scores anywhere are removed."""
    for name, s in scores.items():
        _check_finite(s, name)
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])
    keep = prune_lowest(flat, round(sparsity * flat.numel()))
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].view(s.shape).to(s.device)
        i += s.numel()
    return out


# ----------------------------------------------------------------------------------------------- N:M
def gemm_rows(t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as ``(rows, in)`` rows, the input dimension last: ``(out, in)`` for a linear layer,
    ``(out * prod(kernel), in / groups)`` for a convolution."""
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def from_gemm_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``gemm_rows``."""
    if len(shape) == 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def parse_nm(nm: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything else (or N >= M) is a ``ValueError`` naming the rule."""
    try:
        n_str, m_str = str(nm).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ValueError(f"{nm!r} is not of the form N:M with integers, e.g. 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"{nm!r}: need 0 < N < M (keep N of every M weights), e.g. 2:4 or 1:4")
    return n, m


def nm_fits(weight_shape: torch.Size, m: int) -> bool:
    """Whether the input dimension of a weight is a multiple of M (else: left dense, or padded)."""
    return weight_shape[1] % m == 0


def nm_mask(scores: torch.Tensor, n: int, m: int, pad: bool = False) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive weights along the input dimension.

    With ``pad`` an input size that is not a multiple of ``m`` is treated as zero-padded to the next multiple (what a
    sparse kernel would do): the last, short group of ``r`` weights keeps ``min(n, r)`` of them.
    """
    _check_finite(scores, "nm")
    rows = gemm_rows(scores.detach().float())  # (R, K)
    k = rows.shape[1]
    rem = k % m
    if rem and not pad:
        raise PruningError(f"nm {n}:{m}: input size {k} is not a multiple of {m}")
    if rem:
        rows = F.pad(rows, (0, m - rem), value=float("-inf"))  # padding loses to every real weight
    groups = rows.reshape(rows.shape[0], -1, m)  # (R, K / M, M)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    keep = keep.reshape(rows.shape[0], -1)[:, :k]
    return from_gemm_rows(keep, scores.shape).contiguous()


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` (input dimension, zero-padded) holding more than ``n`` non-zero weights."""
    rows = gemm_rows(weight.detach() != 0)
    rem = rows.shape[1] % m
    if rem:
        rows = F.pad(rows, (0, m - rem), value=False)
    return int((rows.reshape(rows.shape[0], -1, m).sum(-1) > n).sum())


# ----------------------------------------------------------------------------------------------- kernels
def kernel_scores(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every kernel ``W[o, i]``: shape ``(out, in / groups)``."""
    return weight.detach().abs().flatten(2).sum(-1)


def expand_kernel_mask(kmask: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """``(out, in)`` kernel keep-mask -> weight-shaped keep-mask."""
    return kmask.reshape(*kmask.shape, *([1] * (len(weight_shape) - 2))).expand(weight_shape).contiguous()


# ----------------------------------------------------------------------------------------------- patterns
@dataclass
class PatternChoice:
    """The patterns chosen for one layer: ``codes`` (bit i = kernel position i kept, row-major), most frequent
    first, and how many kernels use each."""

    codes: list[int]
    kernel_size: tuple[int, ...]
    counts: list[int]

    def grids(self) -> list[list[list[int]]]:
        """Each pattern as a 0/1 grid (2-D kernels) or a flat 0/1 list."""
        p = math.prod(self.kernel_size)
        out = []
        for c in self.codes:
            bits = [(c >> i) & 1 for i in range(p)]
            if len(self.kernel_size) == 2:
                kh, kw = self.kernel_size
                out.append([bits[r * kw:(r + 1) * kw] for r in range(kh)])
            else:
                out.append(bits)
        return out


def pattern_mask(weight: torch.Tensor, keep: int, num_patterns: int,
                 allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, PatternChoice]:
    """Intra-kernel pattern pruning (PatDNN, Niu et al. 2020): every kernel keeps ``keep`` of its positions, and all
    kernels of the layer share a set of at most ``num_patterns`` patterns.

    1. Each kernel votes for its natural pattern: its ``keep`` positions of largest magnitude.
    2. The ``num_patterns`` most frequent patterns over the layer form the set (ties: lower code first).
    3. Each kernel takes the pattern of the set that keeps the most of its energy (sum of squares).

    ``allowed`` (weight-shaped, bool) marks weights already pruned as unavailable: they count as zero.
    """
    w = weight.detach().float()
    if allowed is not None:
        w = w * allowed
    ksize = tuple(w.shape[2:])
    p = math.prod(ksize)
    if not keep < p <= 62:
        raise PruningError(f"pattern pruning keeps {keep} of {p} kernel positions: need keep < positions <= 62")
    energy = w.reshape(-1, p).pow(2)  # (kernels, P)
    natural = torch.zeros_like(energy, dtype=torch.bool).scatter_(1, energy.topk(keep, dim=1).indices, True)
    weights = 1 << torch.arange(p, dtype=torch.int64, device=w.device)
    codes = (natural.long() * weights).sum(1)  # (kernels,) one bit per kept position
    live = energy.sum(1) > 0  # an all-zero kernel has no natural pattern: it does not vote
    uniq, counts = (codes[live] if live.any() else codes).unique(return_counts=True)
    ranked = sorted(zip(counts.tolist(), uniq.tolist()), key=lambda t: (-t[0], t[1]))[:num_patterns]
    chosen = torch.tensor([c for _, c in ranked], dtype=torch.int64, device=w.device)
    bits = (chosen[:, None] & weights[None, :]) != 0  # (Q, P)
    best = (energy @ bits.float().T).argmax(1)  # (kernels,) first maximum = the more frequent pattern
    mask = bits[best].reshape(w.shape)
    used = torch.bincount(best, minlength=len(chosen)).tolist()
    return mask, PatternChoice(codes=[c for _, c in ranked], kernel_size=ksize, counts=used)
