"""Channel and head-group scores of LLM width pruning: a higher score is kept.

MLP channel ``j`` of a layer couples row ``j`` of every producer (``gate_proj``, ``up_proj``; GPT-2 ``c_fc``) with
column ``j`` of the consumer (``down_proj``; ``c_proj``). With ``h`` the consumer's input (``act(gate x) * up x``)
and ``x`` the producers' input:

- ``variance`` (VBP): ``Var[h_j]`` over the calibration tokens. A channel of small variance is close to a constant,
  which mean compensation puts back into the bias.
- ``magnitude``: the L2 norm of all coupled weights, ``sqrt(sum_p ||W_p[j, :]||^2 + ||W_down[:, j]||^2)``.
- ``wanda`` (structured Wanda): the sum over the channel's weights of ``|W| * ||input feature||_2``:
  ``sum_p |W_p[j, :]| @ ||x|| + ||h_j|| * sum_o |W_down[o, j]|``.
- ``fluctuation`` (FLAP's metric): ``E[(h_j - c_j)^2] * ||W_down[:, j]||^2``, the output energy channel ``j`` carries
  beyond what compensation restores for free: its variance when the consumer has a bias (``c = mean``), its second
  moment when it has none (``c = 0``, no intercept).
- ``obs`` (structured Optimal Brain Surgeon, as ZipLM / SlimGPT): units removed one at a time, each the one whose
  removal costs least once the consumer is refitted by least squares over the units still kept:
  ``cost(G) = tr(W_G (H^-1_GG)^-1 W_G^T)`` with ``H`` the (ridged) second moment of the consumer's input, then ``W``
  and ``H^-1`` updated for its removal. Correlated units are handled: a unit whose output the others can reproduce
  goes early. Scores are the removal order (the first removed scores lowest); units left when ``keep`` are reached
  score above all removed ones, by their last cost.
- ``random``: uniform scores from ``seed`` (a baseline).

A GQA group (key-value head ``g`` with its ``r`` query heads) is scored the same way on its rows of ``q``, ``k``, ``v``
and its columns of ``o_proj`` (``variance``: summed variance of its ``r * head_dim`` ``o_proj`` inputs).

Example:
    >>> s = get_criterion("variance")(ctx)        # (channels,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from prunekit.pruning.structured.stats import ChannelStats

from .stats import input_norm


@dataclasses.dataclass
class Unit:
    """What a criterion sees: ``rows`` (producer weights ``(out, in)``; rows ``members[i][c]`` of producer ``i``
    belong to unit ``c``), ``cols`` (consumer weight ``(out, in)``, columns ``cons_members[c]``) and the input
    statistics."""

    rows: list[torch.Tensor]
    members: list[torch.Tensor]  # per producer: (units, k) row indices of each unit (k = 1 for MLP channels)
    cols: torch.Tensor
    cons_members: torch.Tensor  # (units, m) consumer column indices per unit
    row_inputs: list[ChannelStats | None]  # stats of each producer's input (None when not collected)
    col_input: ChannelStats | None
    seed: int = 0
    centered: bool = True  # the consumer can take an intercept (a bias): moments about the mean, else raw
    keep: int | None = None  # how many units will be kept (``obs`` stops there)

    @property
    def count(self) -> int:
        return self.cons_members.shape[0]


Criterion = Callable[[Unit], torch.Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    def deco(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return deco


def list_criteria() -> list[str]:
    return list(CRITERIA)


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"criterion {name!r} is unknown; valid: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def needs_stats(name: str) -> tuple[bool, bool, bool]:
    """(needs producer-input statistics, consumer-input statistics, the consumer input's covariance)."""
    return {"variance": (False, True, False), "wanda": (True, True, False), "fluctuation": (False, True, False),
            "obs": (False, True, True)}.get(name, (False, False, False))


OBS_RIDGE = 1e-2  # relative to mean(diag H)


@register_criterion("variance")
def variance(u: Unit) -> torch.Tensor:
    if u.col_input is None:
        raise ValueError("criterion 'variance' needs statistics of the consumer's input")
    return u.col_input.var.to(u.cols.device)[u.cons_members].sum(1)


@register_criterion("magnitude")
def magnitude(u: Unit) -> torch.Tensor:
    sq = u.cols.detach().double().square().sum(0)[u.cons_members].sum(1)  # (units,)
    for w, mem in zip(u.rows, u.members):
        sq = sq + w.detach().double().square().sum(1)[mem].sum(1)
    return sq.sqrt()


@register_criterion("wanda")
def wanda(u: Unit) -> torch.Tensor:
    if u.col_input is None or any(s is None for s in u.row_inputs):
        raise ValueError("criterion 'wanda' needs statistics of the producers' and the consumer's inputs")
    dev = u.cols.device
    col = u.cols.detach().double().abs().sum(0) * input_norm(u.col_input).to(dev)  # (in,)
    score = col[u.cons_members].sum(1)
    for w, mem, st in zip(u.rows, u.members, u.row_inputs):
        r = w.detach().double().abs() @ input_norm(st).to(dev)  # (out,)
        score = score + r[mem].sum(1)
    return score


@register_criterion("fluctuation")
def fluctuation(u: Unit) -> torch.Tensor:
    if u.col_input is None:
        raise ValueError("criterion 'fluctuation' needs statistics of the consumer's input")
    dev = u.cols.device
    energy = u.col_input.var if u.centered else u.col_input.var + u.col_input.mean.square()
    col = energy.to(dev) * u.cols.detach().double().square().sum(0)
    return col[u.cons_members].sum(1)


@register_criterion("obs")
def obs(u: Unit) -> torch.Tensor:
    st = u.col_input
    if st is None or st.cov is None:
        raise ValueError("criterion 'obs' needs the covariance of the consumer's input")
    dev = u.cols.device
    H = (st.cov if u.centered else st.cov + torch.outer(st.mean, st.mean)).to(dev).double()
    H = H + OBS_RIDGE * float(H.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(H), dtype=H.dtype, device=dev)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    W = u.cols.detach().double().clone()
    mem = u.cons_members.to(dev)
    n = u.count
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    scores = torch.zeros(n, dtype=torch.float64, device=dev)
    stop = max(1, u.keep if u.keep is not None else 1)
    step = max(1, (n - stop) // 128) if mem.shape[1] == 1 else 1  # MLP channels in chunks: O(D^3) at most
    removed = 0
    while int(alive.sum()) > stop:
        cost = _obs_costs(W, Hinv, mem)
        cost[~alive] = float("inf")
        take = torch.topk(-cost, min(step, int(alive.sum()) - stop)).indices
        G = mem[take].flatten()
        inv_GG = torch.linalg.inv(Hinv[G][:, G])
        W -= (W[:, G] @ inv_GG) @ Hinv[G, :]
        Hinv -= Hinv[:, G] @ inv_GG @ Hinv[G, :]
        W[:, G] = 0
        Hinv[G, :] = 0
        Hinv[:, G] = 0
        alive[take] = False
        scores[take] = torch.arange(removed, removed + len(take), dtype=torch.float64, device=dev)
        removed += len(take)
    last = _obs_costs(W, Hinv, mem)[alive]
    scores[alive] = removed + 1 + last / last.max().clamp_min(1e-30)
    return scores.cpu()


def _obs_costs(W: torch.Tensor, Hinv: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """``tr(W_G (H^-1_GG)^-1 W_G^T)`` of every unit (rows of ``mem``); removed units' entries are meaningless."""
    if mem.shape[1] == 1:
        d = Hinv.diagonal().clamp_min(1e-30)
        return W.square().sum(0)[mem[:, 0]] / d[mem[:, 0]]
    out = torch.empty(len(mem), dtype=torch.float64, device=W.device)
    eye = torch.eye(mem.shape[1], dtype=W.dtype, device=W.device)
    for i, G in enumerate(mem):
        blk = Hinv[G][:, G]
        if float(blk.abs().max()) == 0.0:
            out[i] = float("inf")
            continue
        WG = W[:, G]
        out[i] = (WG @ torch.linalg.solve(blk + 1e-12 * eye, WG.T)).trace()
    return out


@register_criterion("random")
def random(u: Unit) -> torch.Tensor:
    g = torch.Generator().manual_seed(u.seed)
    return torch.rand(u.count, generator=g, dtype=torch.float64)
