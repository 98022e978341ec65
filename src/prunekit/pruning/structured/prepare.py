"""Lifecycle step 1, prepare: check the call against its data before anything is changed, and wrap the data once.

Everything a user can get wrong about ``calib_data`` is found here, as a ``ConfigError`` naming it: a criterion or
compensation that needs data without any, an empty iterable, a first batch the model cannot take.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.pruning.structured.criteria.base import Criterion, split_batch, to_device
from prunekit.pruning.structured.settings import StructuredConfig

log = logging.getLogger(__name__)


class CalibData:
    """The calibration batches of one call: at most ``max_batches`` of ``data``, re-iterable.

    A one-pass iterator (a generator) is read once into a list, since statistics, BatchNorm re-estimation and
    reconstruction each read the data again; a re-iterable (a ``DataLoader``, a list) is read lazily each time.
    """

    def __init__(self, data: Iterable, max_batches: int):
        self.max_batches = max_batches
        self.data = list(itertools.islice(data, max_batches)) if iter(data) is data else data

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.max_batches)

    def __len__(self) -> int:
        try:
            return min(len(self.data), self.max_batches)  # type: ignore[arg-type]
        except TypeError:
            return self.max_batches


def resolve_criterion(s: StructuredConfig, calib_data: Iterable | None) -> str:
    """The criterion this call uses: ``auto`` is ``variance`` with calibration data, else ``l2``."""
    from prunekit.pruning.structured.settings import AUTO_CRITERION, AUTO_WITH_DATA, AUTO_WITHOUT_DATA

    if s.criterion != AUTO_CRITERION:
        return s.criterion
    return AUTO_WITH_DATA if calib_data is not None else AUTO_WITHOUT_DATA


def resolve_compensation(s: StructuredConfig, calib_data: Iterable | None) -> str:
    """The compensation mode this call uses: ``auto`` is ``lstsq`` with calibration data, else ``none``."""
    mode = s.compensation.mode
    if mode != "auto":
        return mode
    if calib_data is None:
        log.info("compensate='auto': no calib_data, so no compensation (pass calibration batches for the "
                 "least-squares refit of the layers reading pruned channels)")
        return "none"
    return "lstsq"


def resolve_refit(s: StructuredConfig, compensate: str) -> bool:
    """Whether this call refits the pruned blocks' consumers: ``refit=None`` (the default) is on with ``lstsq``."""
    return compensate == "lstsq" if s.compensation.refit is None else bool(s.compensation.refit)


def check_data(crit: Criterion, s: StructuredConfig, calib_data: Iterable | None) -> None:
    """Options that need calibration data, without any: one ``ConfigError`` naming the option."""
    if s.compensation.refit and calib_data is None:
        raise ConfigError("refit=True needs calibration data (calib_data=...): it fits the pruned blocks' outputs to "
                          "the dense model's on them; pass calib_data or refit=False")
    if s.reconstruction.steps and calib_data is None:
        raise ConfigError(f"reconstruct_steps={s.reconstruction.steps} needs calibration data (calib_data=...): "
                          "reconstruction fits each block to the dense model's output on it; pass batches or "
                          "reconstruct_steps=0")
    if s.layers.scope == "adaptive" and calib_data is None:
        raise ConfigError("scope='adaptive' measures each group's damage to the output on calibration data: pass "
                          "calib_data=... or use scope 'global' / 'local'")
    if s.calibration.recalibrate_bn and calib_data is None:
        raise ConfigError("recalibrate_bn=True needs calibration data (calib_data=...) to re-estimate the BatchNorm "
                          "statistics; pass batches or recalibrate_bn=False")
    if calib_data is not None:
        return
    if crit.needs_data or crit.needs_stats:
        what = "labelled batches ((inputs, labels) pairs)" if crit.needs_labels else "batches"
        raise ConfigError(f"criterion {crit.name!r} needs calibration data: pass calib_data= an iterable of {what}")
    if s.compensation.mode not in ("none", "auto"):
        raise ConfigError(f"compensate={s.compensation.mode!r} needs calibration data (calib_data=...) to measure "
                          "the pruned channels' statistics; use compensate='none' without data")


@torch.no_grad()
def check_first_batch(model: nn.Module, calib_data: Iterable, device: torch.device) -> None:
    """Run the first calibration batch through the model before anything is changed: a batch the model cannot take
    is a ``ConfigError`` naming ``calib_data``, not a raw error from the middle of pruning."""
    from prunekit.measure.macs import call_model
    from prunekit.pruning.structured.graph import describe_inputs

    batch = next(iter(calib_data), None)
    if batch is None:
        raise ConfigError("calib_data is empty: pass at least one batch (or calib_data=None where no data is needed)")
    x, _ = split_batch(batch)
    was_training = model.training
    model.eval()
    try:
        call_model(model, to_device(x, device))
    except Exception as e:
        pair = (" (a 2-tuple batch is read as (inputs, labels): for a model of several inputs pass "
                "((x1, x2), labels) or ((x1, x2),))" if isinstance(batch, (tuple, list)) and len(batch) == 2 else "")
        raise ConfigError(f"calib_data: the first batch does not run through the model: inputs "
                          f"{describe_inputs(x)} gave {type(e).__name__}: {str(e).strip()[:400]}{pair}") from None
    finally:
        model.train(was_training)


def device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
