"""Channel and head-group scores of LLM width pruning: a higher score is kept.

MLP channel ``j`` of a layer couples row ``j`` of every producer (``gate_proj``, ``up_proj``; GPT-2 ``c_fc``) with
column ``j`` of the consumer (``down_proj``; ``c_proj``). With ``h`` the consumer's input (``act(gate x) * up x``)
and ``x`` the producers' input:

- ``variance`` (VBP): ``Var[h_j]`` over the calibration tokens. A channel of small variance is close to a constant,
  which mean compensation puts back into the bias.
- ``magnitude``: the L2 norm of all coupled weights, ``sqrt(sum_p ||W_p[j, :]||^2 + ||W_down[:, j]||^2)``.
- ``wanda`` (structured Wanda): the sum over the channel's weights of ``|W| * ||input feature||_2``:
  ``sum_p |W_p[j, :]| @ ||x|| + ||h_j|| * sum_o |W_down[o, j]|``.
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


def needs_stats(name: str) -> tuple[bool, bool]:
    """(needs producer-input statistics, needs consumer-input statistics)."""
    return {"variance": (False, True), "wanda": (True, True)}.get(name, (False, False))


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


@register_criterion("random")
def random(u: Unit) -> torch.Tensor:
    g = torch.Generator().manual_seed(u.seed)
    return torch.rand(u.count, generator=g, dtype=torch.float64)
