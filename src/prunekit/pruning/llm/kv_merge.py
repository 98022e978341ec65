"""Fewer key-value heads, every query head kept: GQA groups merged by weighted least squares (``kv_ratio``).

Removing a GQA group (``head_ratio``) removes its query heads too, and with them what they attended to. Merging
keeps all query heads and shares one key-value head among the query heads of several groups: the KV cache and the
``k_proj`` / ``v_proj`` weights shrink by ``kv_ratio``, the attention keeps its query heads and ``o_proj`` keeps its
size. The config then says ``num_key_value_heads = nkv * (1 - kv_ratio)`` with ``num_attention_heads`` unchanged, a
shape every runtime that reads a Llama / Mistral / Qwen2 config accepts.

For a cluster ``C`` of groups merged into one, with ``x`` the attention input (second moment ``S``, from
calibration) and ``W_g`` a group's ``v_proj`` rows (``(head_dim, hidden)``, its bias as one more column):

- values: the query heads ``i`` of group ``g`` read ``v_g`` through their ``o_proj`` columns ``O_i``; the shared
  ``W_v = (sum_g A_g)^-1 sum_g A_g W_g`` with ``A_g = sum_{i in g} O_i^T O_i`` minimises
  ``sum_g E ||sum_{i in g} O_i (v - v_g)||^2`` under the per-token approximation (attention weights ignored);
- keys: head ``i`` scores ``q_i . k_g``; the shared ``W_k`` uses ``A_g = sum_{i in g} E[q_i q_i^T]``
  (``= W_q_i S W_q_i^T``), which minimises ``sum_i E (q_i . (k - k_g))^2`` (rotary rotation ignored).

The merge cost ``sum_g tr(A_g (W - W_g) S (W - W_g)^T)`` of keys plus values (each relative to its own energy)
chooses the clusters: groups are taken in order, each cluster the one not yet used with the cheapest partners
(greedy). Query heads are then permuted so that each cluster's query heads are contiguous (``o_proj`` columns with
them): head ``j`` reads key-value head ``j // (nq / kept)`` as transformers' ``repeat_kv`` expects.

Example:
    >>> prune_width(model, calib_ids, kv_ratio=0.5)   # 8 query / 4 kv heads -> 8 query / 2 kv heads
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.stats import ChannelStats

from .arch import set_weight_oi, weight_oi

RIDGE = 1e-6  # relative, keeps sum_g A_g invertible


def _augmented(m: nn.Linear) -> torch.Tensor:
    """``[W | b]`` in float64 (a zero column without a bias)."""
    W = weight_oi(m).detach().double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return torch.cat([W, b[:, None]], 1)


def _moment(st: ChannelStats) -> torch.Tensor:
    """Uncentred second moment of ``[x, 1]``."""
    if st.cov is None:
        raise PruningError("kv_ratio: merging key-value heads needs the covariance of the attention input")
    S = st.cov + torch.outer(st.mean, st.mean)
    mu = st.mean
    top = torch.cat([S, mu[:, None]], 1)
    return torch.cat([top, torch.cat([mu, mu.new_ones(1)])[None]], 0)


def _weights(q: torch.Tensor, o: torch.Tensor, S: torch.Tensor, nq: int, nkv: int, hd: int) -> dict[str, list]:
    """Per group: ``A`` for keys (query second moments) and for values (``o_proj`` column Gram)."""
    r = nq // nkv
    A_k, A_v = [], []
    for g in range(nkv):
        ak = torch.zeros(hd, hd, dtype=torch.float64, device=q.device)
        av = torch.zeros_like(ak)
        for i in range(g * r, (g + 1) * r):
            Qi = q[i * hd:(i + 1) * hd]  # (hd, hidden + 1)
            ak += Qi @ S @ Qi.T
            Oi = o[:, i * hd:(i + 1) * hd]  # (out, hd)
            av += Oi.T @ Oi
        A_k.append(ak)
        A_v.append(av)
    return {"k": A_k, "v": A_v}


def _merge(Ws: list[torch.Tensor], As: list[torch.Tensor]) -> torch.Tensor:
    tot = sum(As)
    tot = tot + RIDGE * float(tot.diagonal().mean().clamp_min(1e-30)) * torch.eye(len(tot), dtype=tot.dtype,
                                                                                   device=tot.device)
    return torch.linalg.solve(tot, sum(A @ W for A, W in zip(As, Ws)))


def _cost(Ws: list[torch.Tensor], As: list[torch.Tensor], S: torch.Tensor) -> float:
    M = _merge(Ws, As)
    err = sum(((A @ (M - W)) @ S * (M - W)).sum() for A, W in zip(As, Ws))
    energy = sum(((A @ W) @ S * W).sum() for A, W in zip(As, Ws))
    return float(err / energy.clamp_min(1e-30))


def clusters(kv: dict[str, list[torch.Tensor]], A: dict[str, list], S: torch.Tensor, keep: int) -> list[list[int]]:
    """Greedy partition of the groups into ``keep`` clusters of equal size, cheapest merges first."""
    nkv = len(kv["k"])
    size = nkv // keep
    left = list(range(nkv))
    out = []

    def cost(c: list[int]) -> float:
        return sum(_cost([kv[t][g] for g in c], [A[t][g] for g in c], S) for t in ("k", "v"))

    while left:
        g0 = left[0]
        c = [g0]
        while len(c) < size:
            best = min((g for g in left if g not in c), key=lambda g: cost([*c, g]))
            c.append(best)
        out.append(sorted(c))
        left = [g for g in left if g not in c]
    return out


@torch.no_grad()
def merge_kv(attn_mods: dict[str, nn.Linear], st: ChannelStats, nq: int, nkv: int, hd: int,
             keep: int) -> dict[str, Any]:
    """Merge the ``nkv`` key-value heads of one attention layer into ``keep`` (``attn_mods``: q, k, v, o Linears).

    Returns a record: the clusters, the relative merge cost of keys and values, the query-head order.
    """
    if nkv % keep or nq % keep:
        raise PruningError(f"kv_ratio: {nkv} key-value heads cannot be merged into {keep} equal clusters "
                           f"({nq} query heads); choose a ratio that keeps a divisor of {nkv}")
    q, o = _augmented(attn_mods["q"]), weight_oi(attn_mods["o"]).detach().double()
    S = _moment(st).to(q.device)
    A = _weights(q, o, S, nq, nkv, hd)
    kv = {t: list(_augmented(attn_mods[t]).split(hd)) for t in ("k", "v")}
    groups = clusters(kv, A, S, keep)
    r = nq // nkv
    heads = [i for c in groups for g in c for i in range(g * r, (g + 1) * r)]  # new query-head order
    rows = torch.cat([torch.arange(i * hd, (i + 1) * hd) for i in heads]).to(q.device)
    cost = {t: [_cost([kv[t][g] for g in c], [A[t][g] for g in c], S) for c in groups] for t in ("k", "v")}
    for t in ("k", "v"):
        merged = torch.cat([_merge([kv[t][g] for g in c], [A[t][g] for g in c]) for c in groups])
        _set(attn_mods[t], merged)
    _set(attn_mods["q"], q[rows])
    set_weight_oi(attn_mods["o"], o[:, rows])
    return {"clusters": groups, "cost_k": cost["k"], "cost_v": cost["v"], "query_order": heads}


def _set(m: nn.Linear, aug: torch.Tensor) -> None:
    """Replace ``m``'s rows by ``aug`` (``[W | b]``), resizing it."""
    W, b = aug[:, :-1], aug[:, -1]
    m.weight = nn.Parameter(W.to(m.weight.dtype).contiguous(), requires_grad=m.weight.requires_grad)
    m.out_features = W.shape[0]
    if m.bias is not None:
        m.bias = nn.Parameter(b.to(m.bias.dtype).contiguous(), requires_grad=m.bias.requires_grad)
    elif float(b.abs().max()) > 0:
        raise PruningError("kv_ratio: merging produced a bias on a layer without one")
