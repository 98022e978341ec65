"""BatchNorm recalibration: re-estimate running statistics on clean batches after pruning.

Pruning a producer changes the statistics every later BatchNorm sees; re-estimating them (no gradient step)
recovers much of the accuracy lost before any fine-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.measure import call_model
from prunekit.pruning.structured.criteria.base import split_batch, to_device

log = logging.getLogger(__name__)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Iterable, max_batches: int = 50, device: str | torch.device = "cpu") -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over batches.

    Only BatchNorm layers run in training mode (dropout etc. stay in eval mode); each BN's ``momentum`` and every
    module's training flag are restored afterwards. Returns the number of batches used (0 without BatchNorm).

    Example:
        >>> recalibrate_bn(model, calib_loader, max_batches=50)
    """
    bns = batchnorms(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    n = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every batch weighs the same
            bn.train()
        for batch in data:
            if n >= max_batches:
                break
            x, _ = split_batch(batch)
            call_model(model, to_device(x, device))
            n += 1
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if n == 0:
        raise PruningError("recalibrate_bn got no batches: BatchNorm statistics were reset and not re-estimated")
    _sync_across_ranks(bns)
    log.info("recalibrated %d BatchNorm layers on %d batches", len(bns), n)
    return n


def _sync_across_ranks(bns: list[nn.Module]) -> None:
    """torchrun: average the re-estimated statistics over ranks (each rank saw its own, equally many batches, so the
    average is the cumulative average over all of them); a no-op in one process."""
    from prunekit.distributed import all_reduce_mean, is_distributed

    if not is_distributed():
        return
    bufs = {f"{i}.{k}": getattr(bn, k) for i, bn in enumerate(bns) for k in ("running_mean", "running_var")
            if getattr(bn, k, None) is not None}
    with torch.no_grad():
        for key, value in all_reduce_mean(bufs).items():
            i, k = key.split(".", 1)
            getattr(bns[int(i)], k).copy_(value)


def recalibrate_after_pruning(model: nn.Module, enabled: bool | None, calib_data: Iterable | None, max_batches: int,
                              device: str | torch.device) -> dict:
    """The engine's step: re-estimate BatchNorm statistics unless ``enabled`` is False (``None``: whenever there
    is calibration data). Returns what ``PruneReport.bn_recalibration`` records."""
    bns = batchnorms(model)
    if not bns:
        return {}
    if enabled is False or calib_data is None:
        why = "recalibrate_bn=False" if enabled is False else "no calib_data"
        # a caller that turned it off (PAT recalibrates on its own batches) is told; one that gave no data is warned
        log.log(logging.INFO if enabled is False else logging.WARNING,
                "the %d BatchNorm layers keep the statistics of the unpruned model (%s): accuracy is usually far "
                "below what it is once they are re-estimated; call prunekit.recalibrate_bn(model, batches) before "
                "evaluating", len(bns), why)
        return {"skipped": why}
    n = recalibrate_bn(model, calib_data, max_batches, device)
    return {"layers": len(bns), "batches": n}
