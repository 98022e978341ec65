"""The structured pruning engine, as a lifecycle (torch.optim-like): one method per step, one module per step.

``StructuredPruner(model, example_inputs, config, calib_data=...)``:

1. ``prepare`` (``prepare.py``, ``plan.py``): check the call against its data, trace the graph, plan the units
   (groups) the config allows, per-group ratios (overrides, caps, ``scope="adaptive"``'s allocation);
2. ``calibrate`` (``stats.py``): channel statistics on the calibration data, the criterion's own calibration;
3. ``score`` (``score.py``, ``criteria/``): one score per channel (or head) of every group;
4. ``select`` (``selection.py``, ``search.py``, ``latency.py``, ``verify.py``): which channels go, for a ratio, a
   MACs target or a latency target, checked on a meta copy (a group whose pruning breaks the forward pass, or that
   nothing can compensate, is left whole with a warning and the selection made again without it);
5. ``apply`` (``apply.py``, ``compensation.py``): compensate each group's consumers, then remove the channels;
6. ``recalibrate`` (``bn.py``): re-estimate BatchNorm statistics;
7. ``reconstruct`` (``reconstruct.py``): fit each pruned block to the dense block's output;
8. ``report`` (``report.py``): what was done, as data.

The engine changes the model in place and is not transactional by itself: ``prunekit.prune`` wraps it in
``prunekit.pruning.transaction`` so a failed call leaves the model as it was.

Example:
    >>> report = StructuredPruner(model, torch.randn(1, 3, 32, 32), StructuredConfig(criterion="l1")).run()
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.distributed import all_reduce_mean, check_mapping_same_on_all_ranks, tensor_digest
from prunekit.errors import PruningError
from prunekit.measure import count_params
from prunekit.pruning.structured.apply import apply_selection, out_channels, uncompensable
from prunekit.pruning.structured.criteria import get_criterion
from prunekit.pruning.structured.criteria.base import CalibContext
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import apply_ratio_caps, plan_units, unit_overrides
from prunekit.pruning.structured.prepare import (
    CalibData,
    check_data,
    check_first_batch,
    device_of,
    resolve_compensation,
    resolve_criterion,
    resolve_refit,
)
from prunekit.pruning.structured.report import PruneReport
from prunekit.pruning.structured.score import collect, score_units, scored
from prunekit.pruning.structured.search import count_macs_meta, search_ratio
from prunekit.pruning.structured.selection import Selection, select
from prunekit.pruning.structured.settings import StructuredConfig

log = logging.getLogger(__name__)
MAX_RESELECT = 4  # selections made again after leaving out groups that break the model or cannot be compensated

__all__ = ["StructuredPruner", "apply_selection", "prune_with_settings", "score_units", "selection_digests"]


class StructuredPruner:
    """One structured pruning call: ``run()`` is ``prepare, calibrate, score, select, apply, recalibrate,
    reconstruct`` and returns the ``PruneReport``. ``units_only``: prune only the groups with these names (a group
    is named after its root layer; what ``scope="adaptive"`` uses for its trials)."""

    def __init__(self, model: nn.Module, example_inputs: Any, config: StructuredConfig, *,
                 calib_data: Iterable | None = None, loss_fn: Callable | None = None,
                 device: str | torch.device | None = None, units_only: Collection[str] | None = None):
        self.model, self.example_inputs, self.s = model, example_inputs, config
        self.criterion = name = resolve_criterion(config, calib_data)
        self.crit = get_criterion(name, **({"seed": config.seed} if name == "random" else {}))
        check_data(self.crit, config, calib_data)
        self.calib = CalibData(calib_data, config.calibration.batches) if calib_data is not None else None
        self.loss_fn, self.units_only = loss_fn, units_only
        self.device = torch.device(device) if device is not None else device_of(model)
        self.compensate = resolve_compensation(config, calib_data)
        self.refit_on = calib_data is not None and resolve_refit(config, self.compensate)
        self.report = PruneReport(criterion=name, scope=config.layers.scope,
                                  ratio=config.global_ratio, target_macs=config.target.macs,
                                  preset=config.layers.preset, heads=config.layers.heads, compensate=self.compensate)
        self.t0 = time.perf_counter()

    def run(self) -> PruneReport:
        for step in (self.prepare, self.calibrate, self.score, self.select, self.apply, self.recalibrate,
                     self.refit, self.reconstruct):
            step()
        self.report.seconds = time.perf_counter() - self.t0
        log.info(self.report.summary())
        return self.report

    # ------------------------------------------------------------------------------------------- 1. prepare
    def prepare(self) -> None:
        s, model = self.s, self.model
        if self.calib is not None:
            check_first_batch(model, self.calib, self.device)
            if s.reconstruction.augment:
                from prunekit.pruning.structured.reconstruct import check_token_batch

                check_token_batch(next(iter(self.calib), None), "reconstruct_augment", s.reconstruction.augment,
                                  flag="--reconstruct-augment")
        self.graph = graph = PruningGraph(model, self.example_inputs)
        self.report.macs_before, self.report.params_before = count_macs_meta(graph, self.example_inputs), \
            count_params(model)
        units = apply_ratio_caps(plan_units(graph, s), s, graph)
        if self.units_only is not None:
            units = [u for u in units if u.name in self.units_only]
            if not units:
                raise PruningError(f"none of the groups {sorted(self.units_only)} is among the prunable groups")
        self.overrides = unit_overrides(units, s, graph)
        self.units = units
        if s.layers.scope == "adaptive":
            self._allocate()

    def _allocate(self) -> None:
        from prunekit.pruning.structured.allocate import adaptive_overrides, calib_batches

        n = self.s.calibration.batches  # every trial and the final pruning see the same batches (not reshuffled)
        self.calib = CalibData(calib_batches(self.calib, n), n)
        free = [u for u in self.units if u.name not in self.overrides]
        auto, self.report.allocation = adaptive_overrides(self.model, self.example_inputs, free, self.s, self.calib,
                                                          self.device, prune_with_settings, self.loss_fn)
        self.overrides.update(auto)
        self.units = [u for u in self.units if u.name in self.overrides]  # a group allocated ratio 0 stays whole
        if not self.units:
            raise PruningError("scope='adaptive' leaves every group whole (see the warnings above); nothing to prune")

    # ----------------------------------------------------------------------------------- 2-3. calibrate, score
    def calibrate(self) -> None:
        self.ctx = CalibContext(model=self.model, example_inputs=self.example_inputs, calib_data=self.calib,
                                max_batches=self.s.calibration.batches, device=self.device, loss_fn=self.loss_fn,
                                targets=sorted({n for u in self.units for n in u.layers}))
        if self.crit.needs_stats or self.compensate != "none":
            self.ctx.stats = collect(self.ctx, self.graph, covariance=self.compensate == "lstsq")
        self.crit.calibrate(self.ctx)

    def score(self) -> None:
        s, crit = self.s, self.crit
        normalize = s.layers.normalize if s.layers.scope == "global" and not crit.normalized else "none"
        scores = score_units(crit, self.units, normalize, left_whole=self.graph.left_whole)
        if crit.needs_data or crit.needs_stats:  # torchrun: each rank saw its own batches; rank by the average
            scores = all_reduce_mean(scores)
        self.units, self.scores = scored(self.units, scores, self.graph.left_whole), scores
        trial = select(self.units, scores, s.global_ratio if s.target.macs is None else 0.5, self._scope(),
                       self.overrides, s.layers.max_ratio, s.layers.round_to, s.layers.round_to_wide)
        self._leave_out(self._broken(trial), "breaks the forward pass")  # before the search probes copies

    # ------------------------------------------------------------------------------------------- 4. select
    def select(self) -> None:
        """Select, then check the selection itself: groups it breaks, or that nothing can compensate, are left whole
        and the selection is made again without them (the pool of a global ranking changed)."""
        self.compensator = self._compensator()
        for _ in range(MAX_RESELECT):
            sel = self._select_once()
            bad = self._broken(sel)
            if bad:
                self._leave_out(bad, "breaks the forward pass")
                continue
            if self.compensator is not None and (why := uncompensable(self.compensator, self.units, sel)):
                self._leave_out(list(why), "no consumer can be compensated", why)
                continue
            break
        else:
            raise PruningError(f"no safe selection after leaving out {len(self.graph.left_whole)} groups "
                               f"({', '.join(list(self.graph.left_whole)[:8])}); exclude them with ignore=...")
        self._check_selection(sel)
        self.sel = sel

    def _select_once(self) -> Selection:
        s, report = self.s, self.report
        if s.latency.backend is not None or s.target.latency is not None:  # widths from a measured latency table
            from prunekit.pruning.structured.latency import latency_selection

            sel, report.ratio, report.search, report.latency = latency_selection(
                self.model, self.graph, self.example_inputs, self.units, self.scores, s, self.overrides,
                report.macs_before, self._scope())
            return sel
        scores = self.scores
        if s.target.macs is not None:
            report.ratio, scores, report.search = search_ratio(self.graph, self.example_inputs, self.units, scores,
                                                               s, self.overrides, report.macs_before)
        return select(self.units, scores, report.ratio, self._scope(), self.overrides, s.layers.max_ratio,
                      s.layers.round_to, s.layers.round_to_wide)

    def _check_selection(self, sel: Selection) -> None:
        s = self.s
        if sel.shortfall and s.target.macs is None and s.target.latency is None:
            pooled = sum(u.size for u in self.units if u.name not in self.overrides and u.attention is None)
            raise PruningError(f"ratio {self.report.ratio} cannot be reached with max_ratio {s.layers.max_ratio}: "
                               f"every group hits its cap with {sel.shortfall} of the {pooled} pooled channels still "
                               "to remove; lower the ratio or raise max_ratio")
        if sel.capped:
            log.warning("%d of %d groups held at max_ratio=%s (they would have lost more): %s", len(sel.capped),
                        len(self.units), s.layers.max_ratio, _names(sel.capped))
        self.report.capped = list(sel.capped)
        self.report.left_whole = dict(self.graph.left_whole)
        check_mapping_same_on_all_ranks(selection_digests(sel), "pruning masks")

    def _broken(self, sel: Selection) -> list[str]:
        from prunekit.pruning.structured.verify import broken_units

        return broken_units(self.graph, self.units, sel, self.example_inputs)

    def _leave_out(self, names: list[str], why: str, details: dict[str, str] | None = None) -> None:
        if not names:
            return
        for n in names:
            self.graph.left_whole[n] = (details or {}).get(n, why)
        self.units = [u for u in self.units if u.name not in set(names)]
        log.warning("%d groups left unpruned: %s (%s)%s", len(names), why, _names(names),
                    "; torch-pruning cannot map their channels consistently, or they feed an output it did not see "
                    "as one, e.g. inside a dict or tuple" if why.startswith("breaks") else "")
        if not self.units:
            raise PruningError(f"every prunable group of {type(self.model).__name__} was left whole ({why}: "
                               f"{_names(names)}); nothing can be pruned")

    def _compensator(self) -> Any:
        if self.compensate == "none":
            return None
        from prunekit.pruning.structured.compensation import Compensator

        return Compensator(self.model, self.compensate, self.ctx.stats)

    # ------------------------------------------------------------------------------------------- 5. apply
    def apply(self) -> None:
        s, report = self.s, self.report
        before = out_channels(self.graph)
        self.dense = copy.deepcopy(self.model) if report.latency and s.latency.verify_runs else None
        self.reference = None  # reconstruction's targets: the model before pruning (shared with the latency check)
        self.refit_layers = self._refit_layers() if self.refit_on else {}
        if s.reconstruction.steps or self.refit_layers:
            self.reference = self.dense if self.dense is not None else copy.deepcopy(self.model)
        report.groups, report.compensation = apply_selection(self.graph, self.units, self.sel, self.compensator)
        report.layers = {n: [b, a] for n, a in out_channels(self.graph).items() if (b := before[n]) != a}
        if not report.groups:
            raise PruningError(f"nothing was pruned at ratio {report.ratio}: every group rounds back to its full "
                               "size (lower round_to or raise the ratio)")
        report.macs_after, report.params_after = count_macs_meta(self.graph, self.example_inputs), \
            count_params(self.model)
        if self.dense is not None:
            from prunekit.pruning.structured.latency import verify_latency

            report.latency.update(verify_latency(self.dense, self.model, self.example_inputs,
                                                 report.latency["backend"], s.latency.threads, s.latency.verify_runs))

    # ------------------------------------------------------------------------------- 6-7. recalibrate, reconstruct
    def recalibrate(self) -> None:
        """BatchNorm re-estimation after pruning and compensation (also in ``scope="adaptive"``'s trials: their
        damage is then measured on the model the final pruning gives)."""
        from prunekit.pruning.structured.bn import recalibrate_after_pruning

        self.report.bn_recalibration = recalibrate_after_pruning(self.model, self.s.calibration.recalibrate_bn,
                                                                 self.calib, self.s.calibration.batches, self.device)

    def _refit_layers(self) -> dict[str, list[str]]:
        """Block -> the Linear consumers the refit will fit, from the selected groups (before they are applied)."""
        from prunekit.pruning.structured.reconstruct_closed import consumers_of

        layers = consumers_of(self.model, [u for u in self.units if self.sel.removed.get(u.name)])
        if not layers and self.s.compensation.refit:
            log.warning("refit=True: no pruned group's consumer is a Linear inside a block; nothing was refitted")
        return layers

    def refit(self) -> None:
        """Closed-form error-correcting refit of the pruned blocks' consumers (``compensation.refit``; by default
        on with ``lstsq`` wherever a pruned group's consumer is a Linear inside a block)."""
        if not self.refit_layers:
            return
        from prunekit.pruning.structured.reconstruct_closed import refit_consumers

        self.report.refit = refit_consumers(self.model, self.reference, self.calib, self.refit_layers,
                                            max_batches=self.s.calibration.batches, device=self.device,
                                            asked=bool(self.s.compensation.refit))

    def reconstruct(self) -> None:
        if self.reference is None or not self.s.reconstruction.steps:
            return
        from prunekit.pruning.structured.reconstruct import blocks_of, reconstruct, token_noise

        r = self.s.reconstruction
        blocks = blocks_of(self.model, self.report.groups)
        if not blocks:
            log.warning("reconstruct_steps=%d: no pruned group lies inside a block below the model's root; nothing "
                        "was reconstructed (compensation only)", r.steps)
        self.report.reconstruction = reconstruct(
            self.model, self.reference, self.calib, blocks, steps=r.steps, lr=r.lr,
            max_batches=self.s.calibration.batches, device=self.device, seed=self.s.seed, augment_copies=r.augment,
            train=r.train, input_mix=r.input_mix, augment=token_noise() if r.augment else None)

    def _scope(self) -> str:
        """``adaptive`` selects like ``local``: every group has its own ratio (its override)."""
        return "local" if self.s.layers.scope == "adaptive" else self.s.layers.scope


def prune_with_settings(model: nn.Module, example_inputs: Any, settings: StructuredConfig, *,
                        calib_data: Iterable | None = None, loss_fn: Callable | None = None,
                        device: str | torch.device | None = None,
                        units_only: Collection[str] | None = None) -> PruneReport:
    """The engine on a validated ``StructuredConfig``, in place and not transactional (``prunekit.prune`` is)."""
    return StructuredPruner(model, example_inputs, settings, calib_data=calib_data, loss_fn=loss_fn, device=device,
                            units_only=units_only).run()


def selection_digests(sel: Selection) -> dict[str, str]:
    """Unit name -> a hash of the elements it loses (what torchrun ranks compare before pruning)."""
    return {name: tensor_digest([torch.tensor(sorted(el), dtype=torch.int64)])
            for name, el in sorted(sel.removed.items())}


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")

