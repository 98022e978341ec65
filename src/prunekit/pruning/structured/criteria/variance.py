"""``variance`` (VBP, arXiv 2507.12988) and ``variance_weighted``: how much signal a channel carries to its consumers.

``variance``: the variance over the calibration data of each channel's post-activation output, read where the
group's conv/linear consumers receive it (``fc2``'s input for an MLP, the projection's input for a MobileNetV2 block,
the stream for a residual group; averaged over consumers and over the positions a flatten spreads a channel to).
A channel that barely varies can be replaced by its mean (see ``compensate="mean"``), so it goes first.

``variance_weighted``: variance times the squared norm of the consumer's weight column, summed over consumers: the
expected squared change of the consumers' outputs when the channel is replaced by its mean.

Both need ``ctx.stats`` (``collect_stats``), filled by the engine; ``calibrate`` collects them itself otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.criteria import register_criterion
from prunekit.pruning.structured.criteria.base import CalibContext, Criterion, root_channels, root_name


@register_criterion("variance")
class Variance(Criterion):
    """Variance of each channel's post-activation output over the calibration data."""

    needs_data = True
    needs_stats = True
    weighted = False

    def __init__(self) -> None:
        self.stats: Any = None

    def calibrate(self, ctx: CalibContext) -> None:
        from prunekit.pruning.structured.stats import collect_stats

        stats = ctx.stats
        if not stats:
            if ctx.calib_data is None:
                raise PruningError(f"criterion {self.name!r} needs calibration data: pass calib_data=...")
            stats = collect_stats(ctx.model, ctx.calib_data, ctx.targets, max_batches=ctx.max_batches,
                                  device=ctx.device)
        self.stats = stats

    def __call__(self, group: Any) -> torch.Tensor:
        if self.stats is None:
            raise PruningError(f"criterion {self.name!r} has no statistics for layer {root_name(group)!r}: "
                               "call calibrate(ctx) with calibration data first")
        return self._checked(group, group_scores(group, self.stats, self.weighted, self.name))


@register_criterion("variance_weighted")
class VarianceWeighted(Variance):
    """Variance times the squared norm of the consumers' weight columns (summed over consumers)."""

    weighted = True


def _column_norms(m: nn.Module) -> torch.Tensor:
    """Squared norm of each input channel's weights: (D,)."""
    w = m.weight.detach().double()
    return w.square().sum(dim=[d for d in range(w.dim()) if d != 1])


def group_scores(group: Any, stats: Any, weighted: bool = False, criterion: str = "variance") -> torch.Tensor:
    """One float64 score per root channel of ``group`` from its consumers' input statistics."""
    from prunekit.pruning.structured.compensation import check_channels, input_stats
    from prunekit.pruning.structured.stats import channels_in, consumers

    n = root_channels(group)
    total = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    for c in consumers(group):
        st = input_stats(stats, c.name)
        if st is None:
            continue
        check_channels(st, c, channels_in(c.module))
        idx, root = torch.tensor(c.idxs), torch.tensor(c.root_idxs)
        v = st.var[idx] * (_column_norms(c.module).cpu()[idx] if weighted else 1.0)
        per = torch.zeros(n, dtype=torch.float64).index_add_(0, root, v)
        if not weighted:  # mean over the positions a flatten spreads one channel to
            per /= torch.zeros(n, dtype=torch.float64).index_add_(0, root, torch.ones_like(v)).clamp_min(1)
        total += per
        covered = torch.zeros(n, dtype=torch.bool)
        covered[root] = True
        hits += covered  # consumers seen per channel: variance is their mean, variance_weighted their sum
    if hits.eq(0).all() and not weighted:
        total, hits = _producer_scores(group, stats, n)
    if hits.eq(0).any():
        what = "no conv/linear consumer with input statistics" if hits.eq(0).all() else "statistics for some channels"
        raise PruningError(f"criterion {criterion!r}: the group of layer {root_name(group)!r} has {what}; collect "
                           "statistics for its layers (collect_stats) or exclude it with ignore=...")
    return total if weighted else total / hits


def _producer_scores(group: Any, stats: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback without consumer statistics: the variance at the post-activation points of the group's layers."""
    dg = group._DG
    total = torch.zeros(n, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)
    for item in group:
        m = item.dep.target.module
        name = dg._module2name.get(m) if isinstance(m, nn.Module) else None
        if name not in stats or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        st, idx = stats[name], torch.tensor([int(i) for i in item.idxs])
        if idx.numel() and int(idx.max()) >= st.channels:
            raise PruningError(f"statistics of {name!r} describe {st.channels} channels but its group prunes "
                               f"channel {int(idx.max())}: they were collected on another model")
        root = torch.tensor([int(r) for r in (getattr(item, "root_idxs", None) or item.idxs)])
        total.index_add_(0, root, st.var[idx])
        hits.index_add_(0, root, torch.ones(len(root), dtype=torch.float64))
    return total, hits


@register_criterion("variance_conditional")
class VarianceConditional(Variance):
    """The output error left after ``lstsq`` compensation: ``||w_j||^2 Var(x_j | kept inputs)``, by greedy backward
    elimination (Optimal Brain Surgeon on the consumer's input covariance; for a k x k conv consumer on the
    covariance of its unfolded input patches, a channel being its k*k patch features). Pair it with
    ``compensate="lstsq"``, which collects the same statistics."""

    ridge = 0.1  # relative to the mean variance: the covariance of a few thousand tokens is rank-poor

    def calibrate(self, ctx: CalibContext) -> None:
        from prunekit.pruning.structured.stats import collect_stats

        super().calibrate(ctx)
        inputs = getattr(self.stats, "inputs", {})
        if not inputs or any(s.cov is None for s in inputs.values()):
            if ctx.calib_data is None:
                raise PruningError(f"criterion {self.name!r} needs calibration data: pass calib_data=...")
            self.stats = collect_stats(ctx.model, ctx.calib_data, ctx.targets, max_batches=ctx.max_batches,
                                       device=ctx.device, covariance=True)

    def __call__(self, group: Any) -> torch.Tensor:
        from prunekit.pruning.structured.compensation import check_channels, input_stats
        from prunekit.pruning.structured.stats import PATCHES, channels_in, consumers

        if self.stats is None:
            raise PruningError(f"criterion {self.name!r} has no statistics for layer {root_name(group)!r}: "
                               "call calibrate(ctx) with calibration data first")
        n = root_channels(group)
        total, hits = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for c in consumers(group):
            st = input_stats(self.stats, c.name)
            k2 = c.module.weight[0, 0].numel() if c.module.weight.dim() > 2 else 1
            if st is None or (st.cov is None and k2 == 1):
                continue
            cov = st.cov
            if k2 > 1:  # k x k conv: channels are blocks of k*k features of its unfolded input patches
                ps = getattr(self.stats, "inputs", {}).get(c.name + PATCHES)
                if ps is None or ps.cov is None or ps.channels != st.channels * k2:
                    continue
                cov = ps.cov
            check_channels(st, c, channels_in(c.module))
            idx, root = torch.tensor(c.idxs), torch.tensor(c.root_idxs)
            feat = (idx[:, None] * k2 + torch.arange(k2)).flatten()  # F.unfold's order = weight.flatten(1)'s
            w = c.module.weight.detach().double().flatten(1)[:, feat].cpu()  # (O, |idx| * k2)
            scores = _greedy_obs(w, cov[feat][:, feat], self.ridge, k2=k2)
            total.index_add_(0, root, scores)
            hits[root] = 1.0
        if hits.eq(0).any():
            raise PruningError(f"criterion {self.name!r}: the group of layer {root_name(group)!r} has no linear or "
                               "conv consumer with input covariance statistics (k x k convs need their patch "
                               "statistics: C * k * k <= stats.MAX_PATCH_FEATURES)")
        return self._checked(group, total)


def _greedy_obs(w: torch.Tensor, cov: torch.Tensor, ridge: float, steps: int = 64, k2: int = 1) -> torch.Tensor:
    """Greedy backward elimination of input channels (Optimal Brain Surgeon): repeatedly remove the channels whose
    removal, with the remaining weights refit by least squares, adds the least output error; ``ceil(d / steps)`` at
    a time, with the exact joint update of the weights and the inverse. A channel is ``k2`` consecutive features (the
    kernel positions of a k x k conv's patch; 1 for linear layers), its error the group OBS ``tr(W_j (Hinv_jj)^-1
    W_j^T)`` (``||W[:, j]||^2 / Hinv_jj`` when ``k2 == 1``). Returns per-channel scores that increase along the
    removal order (the running max of those errors)."""
    d = cov.shape[0] // k2
    h = cov + ridge * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(d * k2, dtype=cov.dtype)
    hinv = torch.linalg.inv(h)
    w = w.clone()  # (O, d * k2)
    alive = torch.ones(d, dtype=torch.bool)
    scores = torch.zeros(d, dtype=torch.float64)
    level, block = 0.0, max(1, -(-d // steps))
    ar = torch.arange(k2)
    while int(alive.sum()) > 1:
        live = alive.nonzero().flatten()
        f = (live[:, None] * k2 + ar)  # (L, k2) feature indices of each live channel
        if k2 == 1:
            err = w[:, live].square().sum(0) / hinv.diagonal()[live].clamp_min(1e-30)
        else:
            hb = hinv[f[:, :, None], f[:, None, :]]  # (L, k2, k2) diagonal blocks
            wb = w[:, f].permute(1, 0, 2)  # (L, O, k2)
            sol = torch.linalg.solve(hb, wb.transpose(1, 2))  # (L, k2, O)
            err = (wb.transpose(1, 2) * sol).sum((1, 2))
        order = err.argsort()[:min(block, len(live) - 1)]
        blk = (live[order][:, None] * k2 + ar).flatten()
        levels = torch.cummax(err[order].clamp_min(level), 0).values
        scores[live[order]], level = levels, float(levels[-1])
        inv_bb = torch.linalg.inv(hinv[blk][:, blk])  # (b, b)
        w -= (w[:, blk] @ inv_bb) @ hinv[blk]  # refit the kept weights for the removed block
        hinv -= hinv[:, blk] @ inv_bb @ hinv[blk]  # inverse of the kept inputs' covariance
        alive[live[order]] = False
    scores[alive] = level * 2 + 1.0
    return scores
