"""Bias compensation: keep the expected output of every layer that consumes pruned channels.

``mean`` (VBP): a removed input channel ``p`` contributed ``W[:, p] x_p`` to the consumer; replacing ``x_p`` by its
calibration mean ``mu_p`` gives ``b += W[:, P] @ mu_P`` (Linear) or the kernel summed over space times ``mu_P``
(conv, exact at interior positions; zero padding breaks it at the borders; a transposed conv spreads each input
position over ``prod(stride)`` outputs, so its kernel sum is divided by that: the mean over output positions is
kept, exactly when the kernel size is a multiple of the stride). The change goes into the consumer's bias;
for a conv without bias that feeds a BatchNorm directly it goes into the BN's running mean (the exact equivalent in
eval mode; a later BN recalibration re-estimates that mean, so do not count both); otherwise a bias is created.

``lstsq`` (beyond the paper): refit the kept weights too. With input mean ``mu`` and covariance ``S``, the removed
contribution is regressed on the kept inputs (ridge ``lambda = ridge * mean(diag S_KK)``):
``W_K' = W_K + W_P S_PK (S_KK + lambda I)^-1``, ``b' = b + W_P mu_P - (W_K' - W_K) mu_K``. This is the closed-form
least-squares reproduction of the dense output ``W x + b`` from ``x_K``; a large ridge falls back to ``mean``. Linear
layers and 1x1 convs regress on channels; k x k convs (``stats.patch_supported``) on their unfolded input patches
(``C * k * k`` features, the channel-pruning reconstruction of He et al. 2017 in closed form); other consumers
(depthwise / grouped convs, too wide a patch) get ``mean`` compensation. ``ridge="auto"`` (default) picks the ridge per
layer by 2-fold cross-validation on the two halves of the calibration batches (``ChannelStats.halves``): with few
calibration tokens per input feature a fixed small ridge overfits (on MiniLM-L6, 100 sentences for 1536 features,
ridge 1e-3 reproduces the calibration data well and generalises worse than ``mean``); "no refit" (``mean``) is a
candidate too, so the refit cannot fall below ``mean`` on the held-out half. Fewer than ``TOKENS_PER_FEATURE``
calibration tokens per input feature log one warning per pruning call (``Compensator.finish``): how many layers, the
worst few with the tokens seen and needed, and how much more data the worst needs.

Statistics are read by consumer name (``StatsDict.inputs``, or producer statistics measured at that consumer's input).

Example:
    >>> comp = Compensator(model, "lstsq", collect_stats(model, loader, ["fc1"], covariance=True))
    >>> records = comp.apply(group, idxs)  # before group.prune()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.criteria.base import root_name
from prunekit.pruning.structured.stats import (
    PATCHES,
    ChannelStats,
    Consumer,
    channels_in,
    consumers,
    is_grouped,
    lstsq_supported,
)

log = logging.getLogger(__name__)

MODES = ("none", "mean", "lstsq")
RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # candidates of ridge="auto" (relative to mean diag S_KK)
FALLBACK_RIDGE = 0.1  # ridge="auto" without halves (a single calibration batch)
TOKENS_PER_FEATURE = 4  # lstsq wants >= this many calibration samples (tokens, positions) per input feature
SMALL_SHOWN = 3  # layers named in the one warning about too little calibration data for lstsq


def input_stats(stats: Mapping[str, ChannelStats], layer: str) -> ChannelStats | None:
    """Statistics of ``layer``'s input: ``stats.inputs[layer]``, or any entry measured at ``input of <layer>``."""
    found = getattr(stats, "inputs", {}).get(layer)
    if found is not None:
        return found
    return next((s for s in stats.values() if s.point == f"input of {layer}"), None)


def check_channels(st: ChannelStats, c: Consumer, current: int) -> None:
    """A ``PruningError`` naming the layer when its input statistics do not describe its current input."""
    if st.channels != current or (c.idxs and max(c.idxs) >= st.channels):
        raise PruningError(f"statistics of the input of {c.name!r} describe {st.channels} channels but the layer "
                           f"has {current} input channels: they were collected on another model (or before it "
                           "was pruned); collect them again")


class Compensator:
    """Updates the consumers of removed channels; ``apply`` is called once per group, before ``group.prune()``.

    Args:
        model: the model being pruned (the statistics are looked up by its module names).
        mode: ``"none"``, ``"mean"`` or ``"lstsq"``.
        stats: ``collect_stats`` output (``covariance=True`` for ``lstsq``).
        ridge: ``lstsq`` regularisation relative to the mean variance of the kept inputs, or ``"auto"``
            (cross-validated per layer among ``RIDGES``).

    Example:
        >>> comp = Compensator(model, "mean", stats)
        >>> for group, idxs in groups: comp.apply(group, idxs); group.prune()
    """

    def __init__(self, model: nn.Module, mode: str, stats: Mapping[str, ChannelStats], *,
                 ridge: float | str = "auto"):
        if mode not in MODES:
            raise ConfigError(f"compensate={mode!r} is not a compensation mode; choose one of {', '.join(MODES)}")
        if ridge != "auto" and (isinstance(ridge, str) or ridge < 0):
            raise ConfigError(f"ridge={ridge!r} must be a number >= 0 or 'auto'")
        if mode != "none" and not stats:
            raise PruningError(f"compensate={mode!r} needs channel statistics (collect_stats on calibration data)")
        self.model, self.mode, self.stats, self.ridge = model, mode, stats, ridge
        self.names = {m: n for n, m in model.named_modules()}
        self._alive: dict[str, list[int]] = {}  # consumer -> original input indices still present
        self._warned_bn = False
        self._small: dict[str, tuple[int, int, int, str, str]] = {}  # too little data for lstsq (finish)

    def apply(self, group: Any, idxs: list[int]) -> list[dict[str, Any]]:
        """Compensate every conv/linear consumer of the channels ``group`` removes (root indices ``idxs``).

        Returns one record per consumer: ``name``, ``mode``, ``channels``, ``bias_change`` (norm), ``into``
        (``"bias"``, ``"new bias"`` or ``"<bn>.running_mean"``) and, for ``lstsq``, ``weight_change`` (norm).
        """
        if self.mode == "none":
            return []
        found, skipped = self._found(group)
        records = []
        for c, st in found:
            alive = self._alive.get(c.name)
            if alive is None:  # first time: the statistics must describe the layer's current input
                check_channels(st, c, channels_in(c.module))
                alive = self._alive[c.name] = list(range(st.channels))
            elif len(alive) != channels_in(c.module) or max(c.idxs) >= len(alive):
                raise PruningError(f"{c.name!r} has {channels_in(c.module)} input channels but the compensator "
                                   f"tracked {len(alive)}: prune every group through the same Compensator")
            records.append(self._compensate(c, st, alive, group._DG))
            removed = set(c.idxs)
            self._alive[c.name] = [o for i, o in enumerate(alive) if i not in removed]
        for why in skipped:
            log.warning("compensation skipped for %s", why)
        return records

    def check(self, group: Any) -> None:
        """Raise the ``PruningError`` that ``apply`` would raise for ``group`` (no layer consuming its channels can
        be compensated), without changing anything: the engine checks every group before it prunes any."""
        if self.mode != "none":
            self._found(group)

    def _found(self, group: Any) -> tuple[list[tuple[Consumer, ChannelStats]], list[str]]:
        """(consumers with input statistics, why the others are skipped); none at all is a ``PruningError``."""
        found, skipped = [], []
        for c in consumers(group, self.names, grouped=True):
            st = input_stats(self.stats, c.name)
            if st is None:
                skipped.append(f"{c.name} (no statistics of its input)")
            else:
                found.append((c, st))
        if not found and any(getattr(dep.target.module, "no_compensation", False) for dep, _ in group):
            return found, skipped  # channels that only enter products (a PSA head's key dims): no output to keep
        if not found:
            raise PruningError(f"compensate={self.mode!r}: no layer consuming the channels removed from "
                               f"{root_name(group)!r} can be compensated"
                               + (f": {'; '.join(skipped)}" if skipped else " (no conv, linear or grouped-conv layer "
                                  "reads them; the group ends at the model's output or in a depthwise conv whose "
                                  "consumers are not in the group)")
                               + "; use compensate='none' or leave the group out (ignore=...)")
        return found, skipped

    @torch.no_grad()
    def _compensate(self, c: Consumer, st: ChannelStats, alive: list[int], dg: Any) -> dict[str, Any]:
        m, cur = c.module, torch.tensor(alive)
        P = torch.tensor(sorted(set(c.idxs)))
        keep = torch.ones(len(alive), dtype=torch.bool)
        keep[P] = False
        K = keep.nonzero().flatten()
        W = m.weight.detach().double()
        if getattr(m, "transposed", False):  # ConvTranspose weight is (D, O, k...): as (O, D, k...)
            W = W.transpose(0, 1) / math.prod(m.stride)  # each input position spreads over prod(stride) outputs
        W2 = W.reshape(W.shape[0], W.shape[1], -1)  # (O, D, kernel positions)
        mu = st.mean.to(W.device)[cur.to(W.device)]  # (D,) current input order
        mode, record = self.mode, {}
        feats = self._features(c, st, cur, P, K) if mode == "lstsq" else None
        if mode == "lstsq" and feats is None:
            mode = "mean"
        ridge = None
        if mode == "lstsq":
            # lstsq in feature space: channels (linear, 1x1 conv) or unfolded patches (k x k conv), where feature
            # i * k2 + j is position j of the kernel on input channel i (F.unfold's order = weight.reshape(O, -1))
            fs, cur_f, P_f, K_f = feats
            self._check_size(c.name, fs, m)
            Wf = W.reshape(W.shape[0], -1)  # (O, D * k2)
            W_P, W_K = Wf[:, P_f], Wf[:, K_f]
            ridge = self._ridge(fs, cur_f, W_P, P_f, K_f)
            if math.isinf(ridge):  # cross-validation found no refit better than the mean alone: use the mean
                mode = "mean"
                record.update(ridge=ridge)
        if mode == "mean":
            if is_grouped(m):  # output o reads the inputs of its group only: W2 is (O, D / groups, k2)
                gi, go = W2.shape[1], W2.shape[0] // m.groups
                full = torch.zeros(W2.shape[0], len(alive), dtype=W2.dtype, device=W2.device)
                for g in range(m.groups):
                    full[g * go:(g + 1) * go, g * gi:(g + 1) * gi] = W2[g * go:(g + 1) * go].sum(-1)
                delta = full[:, P] @ mu[P]
            else:
                delta = W2[:, P].sum(-1) @ mu[P]  # (O,)
        else:
            mu_f = fs.mean.to(W.device)[cur_f.to(W.device)]
            D_K = _regress(_sub(fs.cov, cur_f, W.device), W_P, P_f, K_f, ridge)  # (O, |K_f|): W_P x_P on x_K
            delta = W_P @ mu_f[P_f] - D_K @ mu_f[K_f]
            new_w = Wf.clone()
            new_w[:, K_f] = W_K + D_K
            m.weight.copy_(new_w.reshape(m.weight.shape).to(m.weight.dtype))
            record.update(weight_change=float(D_K.norm()), ridge=ridge, features="patches" if fs is not st
                          else "channels")
        into = self._add_bias(c.name, m, delta, dg)
        return {"name": c.name, "mode": mode, "channels": len(P), "bias_change": float(delta.norm()), "into": into,
                **record}

    def _features(self, c: Consumer, st: ChannelStats, cur: torch.Tensor, P: torch.Tensor, K: torch.Tensor
                  ) -> tuple[ChannelStats, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(statistics, original feature index of each current feature, removed and kept feature positions) of
        ``lstsq``, or ``None`` where it falls back to ``mean`` (no covariance, or a consumer it cannot refit)."""
        m = c.module
        if lstsq_supported(m):
            if st.cov is None:
                log.debug("lstsq compensation of %s falls back to mean (no covariance statistics)", c.name)
                return None
            return st, cur, P, K
        ps = getattr(self.stats, "inputs", {}).get(c.name + PATCHES)
        if ps is None or ps.cov is None:
            log.debug("lstsq compensation of %s falls back to mean (no patch statistics of this conv)", c.name)
            return None
        k2 = m.weight[0, 0].numel()
        if ps.channels != st.channels * k2:
            raise PruningError(f"patch statistics of {c.name!r} describe {ps.channels} features, not "
                               f"{st.channels} channels x {k2} kernel positions: collect them again")
        ar = torch.arange(k2)

        def expand(idx: torch.Tensor) -> torch.Tensor:
            return (idx[:, None] * k2 + ar).flatten()

        return ps, expand(cur), expand(P), expand(K)

    def _check_size(self, name: str, fs: ChannelStats, module: nn.Module) -> None:
        """Note (once per layer) when ``lstsq`` is fitted on fewer samples than ``TOKENS_PER_FEATURE`` per input
        feature (MiniLM-L6, keep 0.5, a 1536-wide FFN: the figure rises steeply up to about 4 tokens per feature and
        by a few thousandths beyond; ``benchmarks/minilm_calib.py``): the refit then fits the calibration data more
        than new data, and its gain over ``mean`` shrinks (the cross-validated ridge keeps it at or above ``mean``).
        ``finish`` says it, in one warning for all such layers."""
        need = TOKENS_PER_FEATURE * fs.channels
        if fs.count < need and name not in self._small:
            self._small[name] = (fs.count, fs.channels, need, *self._data_words(module))

    def finish(self) -> None:
        """One warning for every layer ``lstsq`` fitted on too little calibration data (``_check_size``): how many,
        the worst few with their figures, and how much more data the worst needs. Called once the groups are
        applied (``apply_selection``); the record is cleared."""
        if not self._small:
            return
        small, self._small = self._small, {}
        ranked = sorted(small.items(), key=lambda kv: kv[1][2] / max(kv[1][0], 1), reverse=True)
        count, features, need, unit, data = ranked[0][1]
        factor = need / max(count, 1)
        tail = (f"give {factor:.1f}x as much {data} from the deployment domain for the full gain (with less, the "
                "cross-validated refit stays at or above compensate='mean', which needs far less data, but below what "
                "it reaches)")
        if len(ranked) == 1:
            log.warning("lstsq compensation of %r is fitted on %d %s for its %d input features; a stable refit needs "
                        "about %d (%d per feature): %s", ranked[0][0], count, unit, features, need, TOKENS_PER_FEATURE,
                        tail)
            return
        worst = "; ".join(f"{n!r}: {c} for {f} input features, needs about {nd} ({nd / max(c, 1):.1f}x)"
                          for n, (c, f, nd, _, _) in ranked[:SMALL_SHOWN])
        more = f" and {len(ranked) - SMALL_SHOWN} more" if len(ranked) > SMALL_SHOWN else ""
        log.warning("lstsq compensation of %d layers is fitted on fewer %s than a stable refit needs (%d per input "
                    "feature); the worst: %s%s. For the worst, %s", len(ranked), unit, TOKENS_PER_FEATURE, worst, more,
                    tail)

    def _data_words(self, module: nn.Module) -> tuple[str, str]:
        """(what one statistics sample is, what to give more of): tokens for a model fed token ids (it has an
        embedding), positions for a convolution, samples otherwise."""
        if isinstance(module, nn.modules.conv._ConvNd):
            return "calibration positions (images x output positions)", "calibration data (images)"
        if any(isinstance(m, nn.Embedding) for m in self.model.modules()):
            return "calibration tokens", "calibration text"
        return "calibration samples", "calibration data"

    def _ridge(self, st: ChannelStats, cur: torch.Tensor, W_P: torch.Tensor, P: torch.Tensor,
               K: torch.Tensor) -> float:
        """The ridge: given, or the candidate with the least held-out error over the two halves (2-fold CV),
        halved for the full data (the covariance ridge that balances noise scales like 1/count). ``inf`` (no refit:
        ``mean`` compensation) is a candidate too, so scarce or unrepresentative data cannot make ``lstsq`` worse
        than ``mean`` on the held-out half."""
        if self.ridge != "auto":
            return float(self.ridge)
        if st.halves is None or any(h.cov is None for h in st.halves):
            return FALLBACK_RIDGE
        dev = W_P.device
        err = torch.zeros(len(RIDGES) + 1, dtype=torch.float64, device=dev)  # the last: inf (mean compensation)
        for fit, test in (st.halves, st.halves[::-1]):
            S_f, S_t = _sub(fit.cov, cur, dev), _sub(test.cov, cur, dev)
            dmu = (test.mean.to(dev) - fit.mean.to(dev))[cur.to(dev)]
            # D(r) = B^T diag(g) V^T with S_f[K, K] = V diag(e) V^T, B = V^T S_f[K, P] W_P^T, g = 1 / (e + r):
            # every held-out error term is then a cheap function of g
            S_KK = S_f[K][:, K]
            scale = float(S_KK.diagonal().mean().clamp_min(1e-12))
            ev = _eigh(S_KK)
            if ev is None:  # not even float64 converges (degenerate statistics): the fixed ridge, not a crash
                log.warning("lstsq compensation: the calibration covariance is too degenerate to cross-validate the "
                            "ridge; using ridge %g", FALLBACK_RIDGE)
                return FALLBACK_RIDGE
            e, V = ev
            B = V.T @ (S_f[K][:, P] @ W_P.T)  # (|K|, O)
            cross = (B * (V.T @ (S_t[K][:, P] @ W_P.T))).sum(1)  # (|K|,)
            quad = (V.T @ S_t[K][:, K] @ V) * (B @ B.T)  # (|K|, |K|)
            base = ((W_P @ S_t[P][:, P]) * W_P).sum()  # E_test ||W_P (x_P - mu_P)||^2
            u, shift0 = V.T @ dmu[K], W_P @ dmu[P]  # the bias fitted on one half misses the other's mean
            for i, r in enumerate(RIDGES):
                g = 1.0 / (e + r * scale)
                shift = shift0 - B.T @ (g * u)
                err[i] += base - 2 * (g * cross).sum() + g @ quad @ g + shift.square().sum()
            err[-1] += base + shift0.square().sum()  # g = 0
        best = int(err.argmin())
        return math.inf if best == len(RIDGES) else RIDGES[best] / 2

    def _add_bias(self, name: str, m: nn.Module, delta: torch.Tensor, dg: Any) -> str:
        if m.bias is not None:
            m.bias.add_(delta.to(m.bias.dtype))
            return "bias"
        bn = _following_bn(m, dg)
        if bn is not None:
            bn.running_mean.sub_(delta.to(bn.running_mean.dtype))  # BN(y + d) with mean rm == BN(y) with rm - d
            if not self._warned_bn:
                log.info("mean compensation of bias-free convs is folded into the running mean of the BatchNorm "
                         "after them; a later BatchNorm recalibration re-estimates those means (it does the same job)")
                self._warned_bn = True
            return f"{self.names.get(bn, 'batchnorm')}.running_mean"
        m.bias = nn.Parameter(delta.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
        return "new bias"


def _eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigen-decomposition of a covariance in float64 (eigenvalues clamped at 0): float32 first (it only ranks a few
    ridge candidates, and is fast), float64 when float32 does not converge on an ill-conditioned matrix, ``None``
    when neither does."""
    for dtype in (torch.float32, torch.float64):
        try:
            e, V = torch.linalg.eigh(S.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError: "failed to converge"
            continue
        if torch.isfinite(e).all() and torch.isfinite(V).all():
            return e.double().clamp_min(0), V.double()
    return None


def _sub(cov: torch.Tensor, cur: torch.Tensor, device: torch.device) -> torch.Tensor:
    cur = cur.to(device)
    return cov.to(device)[cur][:, cur]


def _regress(S: torch.Tensor, W_P: torch.Tensor, P: torch.Tensor, K: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W_P S_PK (S_KK + lambda I)^-1`` with ``lambda = ridge * mean(diag S_KK)``: (O, |K|)."""
    S_KK = S[K][:, K]
    lam = max(ridge, 1e-12) * float(S_KK.diagonal().mean().clamp_min(1e-12))
    A = S_KK + lam * torch.eye(len(K), dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(A)
    rhs = S[K][:, P] @ W_P.T  # (|K|, O)
    X = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(A, rhs).solution
    return X.T


def _following_bn(m: nn.Module, dg: Any) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm that reads ``m``'s output and nothing else, when it is ``m``'s only reader."""
    node = dg.module2node.get(m) if dg is not None else None
    if node is None or len(node.outputs) != 1:
        return None
    nxt = node.outputs[0]
    bn = nxt.module
    if (nxt.type == tp.ops.OPTYPE.BN and len(nxt.inputs) == 1 and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.track_running_stats and bn.running_mean is not None):
        return bn
    return None
