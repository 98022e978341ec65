"""The structured pruning engine: score the channels of every group once, select, compensate, remove.

Lifecycle (torch.optim-like): trace the graph -> plan the units -> calibrate the criterion (and collect
statistics) -> score -> select (a ratio, or a ratio searched for ``target_macs``) -> for each group: compensate
its consumers, then ``group.prune()``.

Example:
    >>> report = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.5)
    >>> report.macs_kept
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.measure import count_params
from prunekit.pruning.structured.criteria import get_criterion
from prunekit.pruning.structured.criteria.base import CalibContext, Criterion
from prunekit.pruning.structured.graph import PruningGraph, Unit
from prunekit.pruning.structured.heads import sync_attributes
from prunekit.pruning.structured.plan import apply_ratio_caps, plan_units, unit_overrides
from prunekit.pruning.structured.report import GroupRecord, PruneReport
from prunekit.pruning.structured.search import count_macs_meta, search_ratio
from prunekit.pruning.structured.selection import Selection, select
from prunekit.pruning.structured.settings import PruneSettings
from prunekit.train.distributed import all_reduce_mean, check_mapping_same_on_all_ranks, tensor_digest

log = logging.getLogger(__name__)


def prune(model: nn.Module, example_inputs: Any, criterion: str = "l1", ratio: float | None = None, *,
          keep: float | None = None, target_macs: float | None = None, target_latency: float | None = None,
          latency_backend: str | None = None, scope: str = "global", calib_data: Iterable | None = None,
          compensate: str = "none", preset: str | None = None, ignore: str | Iterable[str] = (),
          only: str | Iterable[str] = (), ratio_overrides: dict[str, float] | None = None,
          ratio_caps: dict[str, float] | None = None, round_to: int | None = None, round_to_wide: int | None = None,
          max_ratio: float = 0.9, heads: bool = False, normalize: str = "mean", calib_batches: int = 50,
          seed: int = 0, recalibrate_bn: bool | None = None, reconstruct_steps: int = 0,
          reconstruct_lr: float = 0.01, reconstruct_augment: int = 0, reconstruct_train: str = "pruned",
          reconstruct_input_mix: float = 0.0, loss_fn: Callable | None = None,
          device: str | torch.device | None = None) -> PruneReport:
    """Prune ``model`` in place (structured: whole channels, optionally whole attention heads).

    Args:
        model: any ``nn.Module`` that torch-pruning can trace.
        example_inputs: a tensor, tuple or dict of tensors the model accepts (also used to count MACs).
        criterion: channel scoring rule (``prunekit.pruning.list_criteria()``).
        ratio: fraction of channels to remove (default 0.5); exclusive with ``target_macs``.
        keep: fraction of channels to keep, as papers say it (``keep=0.65`` is ``ratio=0.35``).
        target_macs: fraction of MACs to keep; the global ratio is searched on copies (within 1%).
        target_latency: fraction of the dense latency to keep on ``latency_backend`` (default eager), predicted
            from a cached per-layer latency table and checked by a paired timing (``report.latency``).
        latency_backend: ``"eager"`` or ``"onnxruntime"``: kept channel counts chosen at the top of that backend's
            measured latency steps (``prunekit.pruning.structured.latency``), with any of the targets.
        scope: ``"global"`` (one threshold over all groups), ``"local"`` (same ratio per group) or
            ``"adaptive"`` (per-group ratios from each group's measured damage to the output on ``calib_data``,
            channel-weighted mean ``ratio``; see ``prunekit.pruning.structured.allocate``).
        calib_data: iterable of batches (tensors, (x, y) pairs or dicts) for data-driven criteria/compensation.
        compensate: ``"none"``, ``"mean"`` or ``"lstsq"`` bias compensation of consumers.
        preset: ``"mlp-only"`` (transformer MLPs) or ``"interior"`` (CNN block-internal channels).
        ignore, only: module-name regexes (a parent's name covers its children).
        ratio_overrides: ``{regex: ratio}`` per-layer ratios.
        ratio_caps: ``{regex: max ratio}`` per-layer caps (e.g. ``prunekit.report.ratio_caps`` of a sensitivity
            analysis); a cap of 0 leaves the group unpruned.
        round_to: kept channels rounded to a multiple of this.
        round_to_wide: layers keeping at least this many channels are rounded to a multiple of it instead
            (ONNX Runtime on CPU: ``4 * recommended_round_to("onnxruntime")``, its sets of four SIMD blocks).
        max_ratio: no group loses more than this fraction of its channels (never all of them).
        heads: remove whole attention heads (timm / HF BERT-style attention), ranked within each attention
            layer at that layer's ratio; without it attention projections keep all their channels.
        normalize: per-layer score normalisation for global ranking (``"mean"``, ``"max"``, ``"none"``).
        calib_batches: batches of ``calib_data`` used.
        seed: seed of the ``random`` criterion.
        recalibrate_bn: re-estimate every BatchNorm's running statistics on ``calib_batches`` batches of
            ``calib_data`` after pruning and compensation (``None``, the default: whenever ``calib_data`` is given
            and the model has BatchNorm; ``False`` keeps the stale statistics, said in the log and the report;
            no ``calib_data`` is a warning). Pruning changes the
            statistics every later BatchNorm sees: without it a pruned BN CNN is often near chance until retrained.
            Compensation survives it: weight refits (``lstsq``) are untouched, and a mean folded into a BatchNorm
            is exactly what the re-estimated running mean holds. Reported in ``PruneReport.bn_recalibration``.
        reconstruct_steps: after compensation (and BatchNorm recalibration), fit the pruned layers of every block
            that holds a pruned group to the dense model's block output on ``calib_data``, block by block in
            forward order, this many Adam steps each (0, the default: off). Each block's target is the dense
            output on the dense input, so it also corrects the error earlier blocks pass on; a block keeps its
            best state on held-out calibration batches and never one worse than compensation left it. No labels.
            ``reconstruct_lr``: the step, relative to each parameter's RMS. Reported in
            ``PruneReport.reconstruction``; see ``prunekit.pruning.structured.reconstruct``.
            ``reconstruct_augment``: for token batches (dicts with ``input_ids``), this many perturbed copies of
            each batch the fit trains on (``token_noise``: each token but the first and last swapped, with
            probability 0.3, for a token drawn from the same batch) join the fit, with the dense model's outputs
            on them as targets: less over-fitting of a few hundred sentences. The held-out batches stay clean.
            ``reconstruct_train``: ``"pruned"`` (default) fits the block's pruned layers, ``"block"`` every
            parameter of the block (its norms, attention and unpruned layers too). ``reconstruct_input_mix``:
            probability that a training step takes each element of a block's input from the dense model instead
            of the pruned one (QDrop's random drop; 0, the default: pruned inputs only).
        loss_fn: ``loss_fn(outputs, labels)`` for gradient criteria (default cross-entropy).
        device: where calibration runs (default: the model's device).

    Returns:
        A ``PruneReport``: channels per layer before/after, groups pruned, MACs and params before/after, ...

    Example:
        >>> report = prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.4, preset="interior")
    """
    settings = PruneSettings.build(dict(
        criterion=criterion, ratio=ratio, keep=keep, target_macs=target_macs, target_latency=target_latency,
        latency_backend=latency_backend, scope=scope, compensate=compensate, preset=preset,
        ignore=[ignore] if isinstance(ignore, str) else list(ignore),
        only=[only] if isinstance(only, str) else list(only), ratio_overrides=dict(ratio_overrides or {}),
        ratio_caps=dict(ratio_caps or {}), round_to=round_to, round_to_wide=round_to_wide,
        max_ratio=max_ratio, heads=heads, normalize=normalize, calib_batches=calib_batches, seed=seed,
        recalibrate_bn=recalibrate_bn, reconstruct_steps=reconstruct_steps, reconstruct_lr=reconstruct_lr,
        reconstruct_augment=reconstruct_augment, reconstruct_train=reconstruct_train,
        reconstruct_input_mix=reconstruct_input_mix),
        source="prune()")
    return prune_with_settings(model, example_inputs, settings, calib_data=calib_data, loss_fn=loss_fn, device=device)


def prune_with_settings(model: nn.Module, example_inputs: Any, settings: PruneSettings, *,
                        calib_data: Iterable | None = None, loss_fn: Callable | None = None,
                        device: str | torch.device | None = None,
                        units_only: Collection[str] | None = None) -> PruneReport:
    """``prune`` with a validated ``PruneSettings`` (what the CLI calls). ``units_only``: prune only the groups
    with these names (a group is named after its root layer); what ``scope="adaptive"`` uses for its trials."""
    t0 = time.perf_counter()
    s = settings
    crit = get_criterion(s.criterion, **({"seed": s.seed} if s.criterion == "random" else {}))
    _check_data(crit, s, calib_data)
    if calib_data is not None and iter(calib_data) is calib_data:  # a one-pass iterator: statistics, then BN
        calib_data = list(itertools.islice(calib_data, s.calib_batches))
    device = device or _device_of(model)
    if calib_data is not None:
        _check_first_batch(model, calib_data, device)
    if s.reconstruct_augment and calib_data is not None:
        from prunekit.pruning.structured.reconstruct import check_token_batch

        check_token_batch(next(iter(calib_data), None), "reconstruct_augment", s.reconstruct_augment,
                          flag="--reconstruct-augment")
    report = PruneReport(criterion=s.criterion, scope=s.scope, ratio=s.global_ratio, target_macs=s.target_macs,
                         preset=s.preset, heads=s.heads)
    graph = PruningGraph(model, example_inputs)
    report.macs_before, report.params_before = count_macs_meta(graph, example_inputs), count_params(model)
    units = apply_ratio_caps(plan_units(graph, s), s, graph)
    if units_only is not None:
        units = [u for u in units if u.name in units_only]
        if not units:
            raise PruningError(f"none of the groups {sorted(units_only)} is among the prunable groups")
    overrides = unit_overrides(units, s, graph)
    if s.scope == "adaptive":
        from prunekit.pruning.structured.allocate import adaptive_overrides, calib_batches

        calib_data = calib_batches(calib_data, s.calib_batches)
        free = [u for u in units if u.name not in overrides]
        auto, report.allocation = adaptive_overrides(model, example_inputs, free, s, calib_data, device,
                                                     prune_with_settings, loss_fn)
        overrides.update(auto)
        units = [u for u in units if u.name in overrides]  # a group allocated ratio 0 stays whole
        if not units:
            raise PruningError("scope='adaptive' leaves every group whole (see the warnings above); nothing to prune")
    ctx = CalibContext(model=model, example_inputs=example_inputs, calib_data=calib_data,
                       max_batches=s.calib_batches, device=device, loss_fn=loss_fn,
                       targets=sorted({n for u in units for n in u.layers}))
    if crit.needs_stats or s.compensate != "none":
        ctx.stats = _collect_stats(model, calib_data, ctx, graph, covariance=s.compensate == "lstsq")
    crit.calibrate(ctx)
    scores = score_units(crit, units, normalize=s.normalize if s.scope == "global" and not crit.normalized else "none")
    if crit.needs_data or crit.needs_stats:  # torchrun: each rank saw its own batches; rank by the average
        scores = all_reduce_mean(scores)
    units = _drop_broken(graph, units, scores, s, overrides, example_inputs)

    if s.latency_backend is not None or s.target_latency is not None:  # widths from a measured latency table
        from prunekit.pruning.structured.latency import latency_selection

        sel, report.ratio, report.search, report.latency = latency_selection(
            model, graph, example_inputs, units, scores, s, overrides, report.macs_before, _selection_scope(s))
    else:
        if s.target_macs is not None:
            report.ratio, scores, report.search = search_ratio(graph, example_inputs, units, scores, s, overrides,
                                                               report.macs_before)
        sel = select(units, scores, report.ratio, _selection_scope(s), overrides, s.max_ratio, s.round_to,
                     s.round_to_wide)
    if sel.shortfall and s.target_macs is None and s.target_latency is None:
        pooled = sum(u.size for u in units if u.name not in overrides and u.attention is None)
        raise PruningError(f"ratio {report.ratio} cannot be reached with max_ratio {s.max_ratio}: every group hits "
                           f"its cap with {sel.shortfall} of the {pooled} pooled channels still to remove; lower the "
                           "ratio or raise max_ratio")
    if sel.capped:
        log.warning("%d of %d groups held at max_ratio=%s (they would have lost more): %s", len(sel.capped),
                    len(units), s.max_ratio, ", ".join(sel.capped[:8]) + (" ..." if len(sel.capped) > 8 else ""))
    report.capped = list(sel.capped)
    report.left_whole = dict(graph.left_whole)
    check_mapping_same_on_all_ranks(selection_digests(sel), "pruning masks")
    compensator = _compensator(model, s.compensate, ctx.stats) if s.compensate != "none" else None
    if compensator is not None:  # a group nothing can compensate fails here, before any group is pruned
        for u in units:
            if sel.removed.get(u.name):
                compensator.check(u.group)
    before = _out_channels(graph)
    dense = copy.deepcopy(model) if report.latency and s.latency_verify_runs else None  # for the paired check
    reference = None  # reconstruction's targets: the model before pruning (shared with the latency check)
    if s.reconstruct_steps:
        reference = dense if dense is not None else copy.deepcopy(model)
    report.groups, report.compensation = apply_selection(graph, units, sel, compensator)
    report.layers = {n: [b, a] for n, a in _out_channels(graph).items() if (b := before[n]) != a}
    if not report.groups:
        raise PruningError(f"nothing was pruned at ratio {report.ratio}: every group rounds back to its full size "
                           "(lower round_to or raise the ratio)")
    report.macs_after, report.params_after = count_macs_meta(graph, example_inputs), count_params(model)
    if dense is not None:
        from prunekit.pruning.structured.latency import verify_latency

        report.latency.update(verify_latency(dense, model, example_inputs, report.latency["backend"],
                                             s.latency_threads, s.latency_verify_runs))
    # also in scope="adaptive"'s trials: their damage is then measured on the model the final pruning gives
    report.bn_recalibration = _recalibrate(model, s, calib_data, device)
    if reference is not None:
        from prunekit.pruning.structured.reconstruct import blocks_of, reconstruct, token_noise

        blocks = blocks_of(model, report.groups)
        if not blocks:
            log.warning("reconstruct_steps=%d: no pruned group lies inside a block below the model's root; nothing "
                        "was reconstructed (compensation only)", s.reconstruct_steps)
        report.reconstruction = reconstruct(model, reference, calib_data, blocks, steps=s.reconstruct_steps,
                                            lr=s.reconstruct_lr, max_batches=s.calib_batches, device=device,
                                            seed=s.seed, augment_copies=s.reconstruct_augment,
                                            train=s.reconstruct_train, input_mix=s.reconstruct_input_mix,
                                            augment=token_noise() if s.reconstruct_augment else None)
    report.seconds = time.perf_counter() - t0
    log.info(report.summary())
    return report


def _selection_scope(s: PruneSettings) -> str:
    """``adaptive`` selects like ``local``: every group has its own ratio (its override)."""
    return "local" if s.scope == "adaptive" else s.scope


def selection_digests(sel: Selection) -> dict[str, str]:
    """Unit name -> a hash of the elements it loses (what torchrun ranks compare before pruning)."""
    return {name: tensor_digest([torch.tensor(sorted(el), dtype=torch.int64)])
            for name, el in sorted(sel.removed.items())}


def _drop_broken(graph: PruningGraph, units: list[Unit], scores: dict[str, torch.Tensor], s: PruneSettings,
                 overrides: dict[str, float], example_inputs: Any) -> list[Unit]:
    """Leave out (loudly) the groups whose pruning breaks the forward pass, checked on a meta copy."""
    from prunekit.pruning.structured.verify import broken_units

    trial = select(units, scores, s.global_ratio if s.target_macs is None else 0.5, _selection_scope(s), overrides,
                   s.max_ratio, s.round_to, s.round_to_wide)
    bad = broken_units(graph, units, trial, example_inputs)
    if not bad:
        return units
    kept = [u for u in units if u.name not in bad]
    graph.left_whole.update(dict.fromkeys(bad, "breaks the forward pass"))
    log.warning("%d groups left unpruned: pruning them breaks the forward pass or changes the shape of an output "
                "(torch-pruning cannot map their channels consistently, or they feed an output it did not see as "
                "one, e.g. inside a dict or tuple): %s", len(bad),
                ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    if not kept:
        raise PruningError(f"every prunable group of {type(graph.model).__name__} breaks the forward pass when "
                           "pruned (torch-pruning cannot map its channels); nothing can be pruned")
    return kept


def score_units(crit: Criterion, units: list[Unit], normalize: str = "none") -> dict[str, torch.Tensor]:
    """Unit name -> per-element scores (channels, or heads), optionally normalised per unit."""
    out = {}
    for u in units:
        s = u.element_scores(crit(u.group))
        if normalize != "none":
            d = s.mean() if normalize == "mean" else s.abs().max()
            s = s / d if d > 0 else s
        out[u.name] = s
    return out


def apply_selection(graph: PruningGraph, units: list[Unit], sel: Selection,
                    compensator: Any = None) -> tuple[list[GroupRecord], list[dict[str, Any]]]:
    """Remove the selected elements from ``graph.model`` (the graph may be a copy of the units' graph)."""
    records, compensation = [], []
    attention = {a.name: a for a in graph.attention}
    for u in units:
        elements = sel.removed.get(u.name)
        if not elements:
            continue
        group, idxs = graph.checked_group(u, u.channel_indices(elements))  # raises if a layer would be emptied
        if compensator is not None:
            compensation.extend(compensator.apply(group, idxs))
        group.prune()
        rec = GroupRecord(u.name, list(u.layers), list(u.consumers), u.channels, u.channels - len(idxs), list(idxs))
        if u.attention is not None:
            att = attention[u.attention.name]
            rec.heads_before, rec.heads_after = att.num_heads, att.num_heads - len(elements)
            att.set_heads(rec.heads_after, removed=sorted(elements))
        records.append(rec)
    sync_attributes(graph.model)
    return records, compensation


def _out_channels(graph: PruningGraph) -> dict[str, int]:
    out = {}
    for name in graph.layers:
        m = graph.modules[name]
        out[name] = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
    return out


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _recalibrate(model: nn.Module, s: PruneSettings, calib_data: Iterable | None,
                 device: torch.device) -> dict[str, Any]:
    """BatchNorm recalibration after pruning (``PruneSettings.recalibrate_bn``); what ``PruneReport`` records."""
    from prunekit.pruning.structured.bn import batchnorms, recalibrate_bn

    bns = batchnorms(model)
    if not bns:
        return {}
    if s.recalibrate_bn is False or calib_data is None:
        why = "recalibrate_bn=False" if s.recalibrate_bn is False else "no calib_data"
        # a caller that turned it off (PAT recalibrates on its own batches) is told; one that gave no data is warned
        log.log(logging.INFO if s.recalibrate_bn is False else logging.WARNING,
                "the %d BatchNorm layers keep the statistics of the unpruned model (%s): accuracy is usually far "
                "below what it is once they are re-estimated; call prunekit.recalibrate_bn(model, batches) before "
                "evaluating", len(bns), why)
        return {"skipped": why}
    n = recalibrate_bn(model, calib_data, s.calib_batches, device)
    return {"layers": len(bns), "batches": n}


@torch.no_grad()
def _check_first_batch(model: nn.Module, calib_data: Iterable, device: torch.device) -> None:
    """Run the first calibration batch through the model before anything is changed: a batch the model cannot take
    is a ``ConfigError`` naming ``calib_data``, not a raw error from the middle of pruning (after some groups)."""
    from prunekit.measure.macs import call_model
    from prunekit.pruning.structured.criteria.base import split_batch, to_device
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


def _check_data(crit: Criterion, s: PruneSettings, calib_data: Iterable | None) -> None:
    if s.reconstruct_augment and not s.reconstruct_steps:
        raise ConfigError(f"reconstruct_augment={s.reconstruct_augment} augments the reconstruction's data, but "
                          "reconstruct_steps=0 (off): set reconstruct_steps > 0 or reconstruct_augment=0")
    if not s.reconstruct_steps and (s.reconstruct_input_mix or s.reconstruct_train != "pruned"):
        what = (f"reconstruct_input_mix={s.reconstruct_input_mix}" if s.reconstruct_input_mix
                else f"reconstruct_train={s.reconstruct_train!r}")
        raise ConfigError(f"{what} shapes the reconstruction, but reconstruct_steps=0 (off): set "
                          "reconstruct_steps > 0, or leave reconstruct_input_mix=0 and reconstruct_train='pruned'")
    if s.reconstruct_steps and calib_data is None:
        raise ConfigError(f"reconstruct_steps={s.reconstruct_steps} needs calibration data (calib_data=...): "
                          "reconstruction fits each block to the dense model's output on it; pass batches or "
                          "reconstruct_steps=0")
    if s.recalibrate_bn and calib_data is None:
        raise ConfigError("recalibrate_bn=True needs calibration data (calib_data=...) to re-estimate the BatchNorm "
                          "statistics; pass batches or recalibrate_bn=False")
    if calib_data is not None:
        return
    if crit.needs_data or crit.needs_stats:
        what = "labelled batches ((inputs, labels) pairs)" if crit.needs_labels else "batches"
        raise ConfigError(f"criterion {s.criterion!r} needs calibration data: pass calib_data= an iterable of {what}")
    if s.compensate != "none":
        raise ConfigError(f"compensate={s.compensate!r} needs calibration data (calib_data=...) to measure the "
                          "pruned channels' statistics; use compensate='none' without data")


def _collect_stats(model: nn.Module, calib_data: Iterable | None, ctx: CalibContext, graph: PruningGraph,
                   covariance: bool) -> dict:
    try:
        from prunekit.pruning.structured.stats import collect_stats
    except ImportError as e:
        raise PruningError(f"channel statistics need prunekit.pruning.structured.stats, which is missing: {e}") from e
    from prunekit.pruning.structured.stats import sync_stats

    stats = collect_stats(model, calib_data, ctx.targets, max_batches=ctx.max_batches, device=ctx.device,
                          covariance=covariance, graph=graph)
    return sync_stats(stats)  # torchrun: merged by module name across ranks (a no-op in one process)


def _compensator(model: nn.Module, mode: str, stats: dict) -> Any:
    try:
        from prunekit.pruning.structured.compensation import Compensator
    except ImportError as e:
        raise PruningError(f"compensate={mode!r} needs prunekit.pruning.structured.compensation, which is "
                           f"missing: {e}") from e
    return Compensator(model, mode, stats)
