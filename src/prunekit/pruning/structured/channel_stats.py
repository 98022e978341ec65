"""Per-channel moments (count, mean, variance, optionally covariance) accumulated in float64, and their merge across
ranks: the numbers behind ``collect_stats`` (:mod:`prunekit.pruning.structured.stats`).

Accumulation is Chan et al.'s parallel update of per-chunk (count, mean, M2) sums, each chunk shifted by the
running mean first, so large offsets cost no precision.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.errors import PruningError

CHUNK = 1 << 20  # elements reduced at a time (keeps temporaries small)


@dataclass
class ChannelStats:
    """Statistics of ``C`` channels over ``count`` samples (every position and token counts as a sample).

    Attributes:
        mean: float64 ``[C]``.
        var: float64 ``[C]``, population variance (divided by ``count``).
        count: number of samples.
        cov: float64 ``[C, C]`` population covariance, or ``None``.
        point: where they were measured, e.g. ``"input of layer1.0.conv2"``.
        halves: with a covariance, the statistics of two disjoint halves of the batches (alternating), or
            ``None``; ``lstsq`` compensation chooses its ridge by cross-validation on them.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int
    cov: torch.Tensor | None = None
    point: str = ""
    halves: tuple[ChannelStats, ChannelStats] | None = None

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sample sets together (Chan et al.'s parallel update)."""
        if other.channels != self.channels:
            raise PruningError(f"cannot merge statistics of {self.channels} and {other.channels} channels "
                               f"({self.point or '?'} / {other.point or '?'})")
        n = self.count + other.count
        if other.count == 0 or self.count == 0:
            src = self if other.count == 0 else other
            return copy.deepcopy(src)
        delta = other.mean - self.mean
        w = self.count * other.count / n
        mean = self.mean + delta * (other.count / n)
        var = (self.var * self.count + other.var * other.count + delta.square() * w) / n
        cov = halves = None
        if self.cov is not None and other.cov is not None:
            cov = (self.cov * self.count + other.cov * other.count + torch.outer(delta, delta) * w) / n
        if self.halves is not None and other.halves is not None:
            halves = (self.halves[0].merge(other.halves[0]), self.halves[1].merge(other.halves[1]))
        return ChannelStats(mean, var, n, cov, self.point or other.point, halves)


class StatsDict(dict):
    """``{layer name: ChannelStats of its output channels}`` plus ``inputs``: ``{consumer name: ChannelStats of
    its input features}``. Keyed by module names, so it applies to a deep copy of the model as well."""

    def __init__(self, *args: Any, inputs: Mapping[str, ChannelStats] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.inputs: dict[str, ChannelStats] = dict(inputs or {})


class _Moments:
    """Running (count, mean, M2[, co-moment]) in float64, updated chunk by chunk (Chan et al.)."""

    def __init__(self, channels: int, covariance: bool):
        self.channels, self.count = channels, 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.cxx = torch.zeros(channels, channels, dtype=torch.float64) if covariance else None

    def to(self, device: torch.device) -> None:
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)
        if self.cxx is not None:
            self.cxx = self.cxx.to(device)

    def _shift(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return self.mean.to(x.dtype) if self.count else x.mean(dims)

    def rows(self, x: torch.Tensor) -> None:  # x: [N, C]
        step = max(1, CHUNK // max(1, self.channels))
        for c in x.split(step):
            k = self._shift(c, (0,))
            d = c - k  # (n, C), small values: no cancellation below
            s1 = d.sum(0).double()
            s2 = torch.linalg.vecdot(d, d, dim=0).double()
            cxx = None
            if self.cxx is not None:
                dd = d.double()
                cxx = dd.T @ dd - torch.outer(s1, s1) / c.shape[0]
            self._merge(c.shape[0], k.double() + s1 / c.shape[0], s2 - s1.square() / c.shape[0], cxx)

    def planes(self, x: torch.Tensor) -> None:  # x: [B, C, S]
        step = max(1, CHUNK // max(1, x[0].numel()))
        for c in x.split(step):
            n = c.shape[0] * c.shape[2]
            k = self._shift(c, (0, 2))
            d = c - k.view(1, -1, 1)
            s1 = d.sum((0, 2)).double()
            s2 = torch.linalg.vecdot(d, d, dim=2).sum(0).double()
            self._merge(n, k.double() + s1 / n, s2 - s1.square() / n, None)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor, cxx: torch.Tensor | None) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        w = self.count * n / total
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2.clamp_min(0) + delta.square() * w
        if self.cxx is not None:
            self.cxx = self.cxx + cxx + torch.outer(delta, delta) * w
        self.count = total

    def result(self, where: str) -> ChannelStats:
        n = max(self.count, 1)
        cov = None if self.cxx is None else (self.cxx / n).cpu()
        return ChannelStats(self.mean.cpu(), (self.m2 / n).cpu(), self.count, cov, where)


class _Accumulator:
    """The statistics of one point. With covariance, batches alternate between two halves (merged at the end;
    the halves let ``lstsq`` compensation choose its ridge by cross-validation)."""

    def __init__(self, channels: int, covariance: bool, where: str):
        self.channels, self.where = channels, where
        self.calls = 0
        self.parts = [_Moments(channels, False)]
        if covariance:
            self.enable_covariance()

    def enable_covariance(self) -> None:
        if self.calls:
            raise PruningError(f"statistics at {self.where}: covariance must be enabled before any data")
        self.parts = [_Moments(self.channels, True), _Moments(self.channels, True)]

    @property
    def covariance(self) -> bool:
        return len(self.parts) == 2

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    def update(self, x: torch.Tensor, dim: int | None, mask: torch.Tensor | None) -> None:
        x = x.detach()
        if not x.is_floating_point():
            raise PruningError(f"statistics at {self.where}: expected a float tensor, got {x.dtype}")
        dim = self._channel_dim(x, dim)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        part = self.parts[self.calls % len(self.parts)]
        self.calls += 1
        if part.mean.device != x.device:
            part.to(x.device)
        xl = x.movedim(dim, -1)
        if mask is not None and xl.dim() == 3 and tuple(xl.shape[:2]) == tuple(mask.shape):
            part.rows(xl[mask])  # [N, C]: real tokens only
        elif dim == x.dim() - 1 or self.covariance or x.dim() == 2:
            part.rows(xl.reshape(-1, self.channels))  # [N, C]
        else:
            part.planes(x.reshape(x.shape[0], self.channels, -1))  # NCHW as [B, C, S]: no transposed copy

    def _channel_dim(self, x: torch.Tensor, dim: int | None) -> int:
        dims = [dim % x.dim()] if dim is not None and x.dim() > 1 else [x.dim() - 1, 1]
        for d in dims:
            if x.dim() > d and x.shape[d] == self.channels:
                return d
        raise PruningError(f"statistics at {self.where}: expected {self.channels} channels, got a tensor of shape "
                           f"{tuple(x.shape)}; pass points={{layer: ...}} to measure elsewhere")

    def result(self) -> ChannelStats:
        if not self.covariance:
            return self.parts[0].result(self.where)
        a, b = (p.result(self.where) for p in self.parts)
        full = a.merge(b)
        full.halves = (a, b) if a.count and b.count else None
        return full



def sync_stats(stats: StatsDict) -> StatsDict:
    """Merge the statistics of all ranks (in place) when ``torch.distributed`` is initialised, so that every rank
    prunes the same channels. Every rank must hold the same layers; ranks are merged in rank order (identical
    floating-point result everywhere). A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    uniq: dict[int, ChannelStats] = {}
    for s in [*(stats[k] for k in sorted(stats)), *(stats.inputs[k] for k in sorted(getattr(stats, "inputs", {})))]:
        uniq.setdefault(id(s), s)
    items = list(uniq.values())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = _pack(items).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    parts = [_unpack(g.cpu(), items) for g in gathered]
    for i, s in enumerate(items):
        merged = parts[0][i]
        for rank in parts[1:]:
            merged = merged.merge(rank[i])
        s.mean, s.var, s.count, s.cov, s.halves = merged.mean, merged.var, merged.count, merged.cov, merged.halves
    return stats


def _pack(items: list[ChannelStats]) -> torch.Tensor:
    """One float64 vector: per entry [count, mean, var, cov (when present), its halves (when present)]."""
    parts = []
    for s in items:
        parts += [torch.tensor([float(s.count)], dtype=torch.float64), s.mean.double().cpu(), s.var.double().cpu()]
        if s.cov is not None:
            parts.append(s.cov.double().cpu().reshape(-1))
        if s.halves is not None:
            parts.append(_pack(list(s.halves)))
    return torch.cat(parts)


def _unpack(flat: torch.Tensor, like: list[ChannelStats]) -> list[ChannelStats]:
    out, o = [], 0
    for s in like:
        c = s.channels
        count, mean, var = int(flat[o].item()), flat[o + 1:o + 1 + c], flat[o + 1 + c:o + 1 + 2 * c]
        o += 1 + 2 * c
        cov = halves = None
        if s.cov is not None:
            cov, o = flat[o:o + c * c].view(c, c), o + c * c
        if s.halves is not None:
            n = _pack(list(s.halves)).numel()
            halves, o = tuple(_unpack(flat[o:o + n], list(s.halves))), o + n
        out.append(ChannelStats(mean, var, count, cov, s.point, halves))
    return out
