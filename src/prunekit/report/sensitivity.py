"""Layer sensitivity: prune each prunable group alone at each ratio (no fine-tuning) and measure the accuracy left.

A *group* is the engine's unit: one torch-pruning group of coupled layers whose output channels go together
(a residual stage's convolutions and shortcut share one), named after its root layer. For every group and ratio
the group alone loses ``ratio`` of its channels (``scope="local"``, lowest criterion scores first), the copy is
optionally BatchNorm-recalibrated, and it is evaluated on a fixed validation subset.

The work is the engine's, done once where it can be: the model is traced once, the criterion calibrated and
scored once, and each (group, ratio) prunes a copy of the traced graph (``copy_graph`` + ``select`` +
``apply_selection``, as the engine's ``target_macs`` search does). The result equals
``prune(copy, x, criterion, ratio, scope="local", only=[group_regex])`` (tested) at a fraction of the cost.

``sensitivity.json``::

    {"format": 1, "criterion": "l1", "ratios": [0.1, 0.3], "baseline": {"top1": 96.4, ...}, "samples": 360,
     "groups": [{"name": "conv1", "layers": [...], "regex": "conv1|layer1\\.0\\.conv2|...", "channels": 16,
                 "results": [{"ratio": 0.1, "kept": 14, "top1": 95.8, "top5": ..., "val_loss": ...,
                              "drop": 0.6, "macs_kept": 0.93}, ...],
                 "mean_drop": 12.3}, ...]}

Example:
    >>> res = layer_sensitivity(model, torch.randn(1, 3, 32, 32), val_batches, criterion="l1")
    >>> most_sensitive(res, 3)          # [(group name, mean top-1 drop), ...]
    >>> ratio_caps(res, max_drop=1.0)   # {group regex: largest ratio that loses at most 1 point}
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit._io import atomic_write_json, atomic_write_text
from prunekit.batch import to_device
from prunekit.errors import ConfigError, PruningError, RunDirError
from prunekit.measure import count_macs
from prunekit.pruning.structured.bn import batchnorms
from prunekit.pruning.structured.bn import recalibrate_bn as recal
from prunekit.pruning.structured.criteria import get_criterion
from prunekit.pruning.structured.criteria.base import CalibContext
from prunekit.pruning.structured.engine import apply_selection, score_units
from prunekit.pruning.structured.graph import PruningGraph, Unit, copy_graph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.selection import keep_count, select
from prunekit.pruning.structured.settings import PruneSettings

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
CALIB_BATCHES = 4  # per trial: every group is pruned at every ratio (the engine's default is 50)
FILES = ("sensitivity.json", "sensitivity.csv", "sensitivity.png")


def check_ratios(ratios: Iterable[Any]) -> list[float]:
    """Sorted distinct ratios, each in (0, 1); a ``ConfigError`` naming ``--ratios`` otherwise."""
    out = []
    for r in ratios:
        try:
            v = float(r)
        except (TypeError, ValueError):
            raise ConfigError(f"--ratios: {r!r} is not a number; give fractions of channels removed, e.g. "
                              "--ratios 0.1,0.3,0.5") from None
        if not 0 < v < 1:
            raise ConfigError(f"--ratios: {v:g} is outside (0, 1); a ratio is the fraction of a group's channels "
                              "removed, e.g. 0.3")
        out.append(v)
    if not out:
        raise ConfigError("--ratios: give at least one ratio, e.g. --ratios 0.1,0.3,0.5,0.7,0.9")
    return sorted(set(out))


def group_regex(layers: Sequence[str]) -> str:
    """A regex matching exactly these module names (the engine full-matches names): ``a\\.b|c``."""
    return "|".join(re.escape(n) for n in layers)


def _evaluate(model: nn.Module, batches: Sequence[Any], device: str | torch.device) -> dict[str, float]:
    from prunekit.train import evaluate

    return evaluate(model, batches, device)


def layer_sensitivity(model: nn.Module, example_inputs: Any, val_data: Iterable, *, criterion: str = "l1",
                      ratios: Sequence[float] = DEFAULT_RATIOS, calib_data: Iterable | None = None,
                      calib_batches: int = CALIB_BATCHES, recalibrate_bn: bool | None = None, preset: str | None = None,
                      ignore: Sequence[str] = (), only: Sequence[str] = (), device: str | torch.device = "cpu",
                      loss_fn: Callable | None = None, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Top-1 of ``model`` with each prunable group pruned alone at each ratio (the model itself is not changed).

    Args:
        model: a trained model (any model the engine can trace).
        example_inputs: inputs to trace it with (and to count MACs).
        val_data: the fixed evaluation set: a re-iterable of ``(inputs, labels)`` batches (a list or a loader
            without shuffling), read once per (group, ratio).
        criterion: the channel scoring rule (``prunekit.pruning.list_criteria()``).
        ratios: fractions of a group's channels removed.
        calib_data: batches for data-driven criteria and BatchNorm recalibration.
        calib_batches: batches of ``calib_data`` used for each.
        recalibrate_bn: re-estimate BatchNorm statistics after pruning each copy (as ``prunekit prune`` does by
            default); needs ``calib_data``.
        preset, ignore, only: which groups to test, as in ``prunekit.prune``.
        device: where calibration and evaluation run.
        loss_fn: loss for gradient criteria (default cross-entropy).
        seed: seed of the ``random`` criterion.
        progress: called with one line per group (the CLI logs it).

    Returns:
        The ``sensitivity.json`` content (module docstring); groups ordered most sensitive first.

    Raises:
        ConfigError: bad ratios, an unknown criterion, a data-driven criterion or ``recalibrate_bn`` without
            ``calib_data``.
        PruningError: the model cannot be traced, or no group is prunable.
    """
    ratios = check_ratios(ratios)
    s = PruneSettings.build(dict(criterion=criterion, scope="local", preset=preset, ignore=list(ignore),
                                 only=list(only), calib_batches=calib_batches, seed=seed), source="sensitivity")
    crit = get_criterion(criterion, **({"seed": seed} if criterion == "random" else {}))
    recalibrate_bn = _check_data(crit, criterion, calib_data, recalibrate_bn)
    val = list(val_data)
    if not val:
        raise ConfigError("val_data is empty: sensitivity needs validation batches to evaluate on")
    t0 = time.perf_counter()
    ctx = CalibContext(model=model, example_inputs=example_inputs, calib_data=calib_data,
                       max_batches=calib_batches, device=device, loss_fn=loss_fn)
    graph, units, scores, macs0, base = _score(ctx, s, crit, val)
    log.info("sensitivity: %d groups x %d ratios, %s, baseline top1 %.2f%% on %d samples", len(units), len(ratios),
             criterion, base["top1"], base["samples"])
    with _quiet_bn():
        groups = [_group(u, k, len(units), ratios, scores, graph, base, macs0, example_inputs, val, calib_data,
                         calib_batches, recalibrate_bn, device, progress) for k, u in enumerate(units, start=1)]
    groups.sort(key=lambda grp: -math.inf if grp["mean_drop"] is None else -grp["mean_drop"])
    return {"format": FORMAT, "criterion": criterion, "ratios": ratios, "recalibrate_bn": recalibrate_bn,
            "calib_batches": calib_batches if calib_data is not None else 0, "baseline": base,
            "samples": base["samples"], "macs": macs0, "groups": groups,
            "seconds": round(time.perf_counter() - t0, 2)}


def _check_data(crit: Any, criterion: str, calib_data: Iterable | None, recalibrate_bn: bool | None) -> bool:
    """Whether BatchNorm is re-estimated (``None``: whenever there is calibration data, as in the engine); what
    needs calibration data without any is a ``ConfigError``."""
    if (crit.needs_data or crit.needs_stats) and calib_data is None:
        raise ConfigError(f"criterion {criterion!r} needs calibration data: pass calib_data= (the CLI uses the "
                          "training images)")
    if recalibrate_bn is None:
        recalibrate_bn = calib_data is not None
    if recalibrate_bn and calib_data is None:
        raise ConfigError("recalibrate_bn=True needs calib_data= batches to re-estimate BatchNorm statistics")
    return recalibrate_bn


def _score(ctx: CalibContext, s: PruneSettings, crit: Any, val: list) -> tuple:
    """(graph, units, raw local scores, MACs, baseline metrics) of the unpruned model, in eval mode."""
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        graph = PruningGraph(model, ctx.example_inputs)
        units = plan_units(graph, s)
        ctx.targets = sorted({n for u in units for n in u.layers})
        if crit.needs_stats:
            from prunekit.pruning.structured.stats import collect_stats

            ctx.stats = collect_stats(model, ctx.calib_data, ctx.targets, max_batches=ctx.max_batches,
                                      device=ctx.device, graph=graph)
        crit.calibrate(ctx)
        scores = score_units(crit, units)  # local scope: raw scores, as the engine uses them
        macs0 = count_macs(model, ctx.example_inputs)
        base = _evaluate(model, val, ctx.device)
    finally:
        model.train(was_training)
    return graph, units, scores, macs0, base


@contextlib.contextmanager
def _quiet_bn() -> Iterator[None]:
    """One "recalibrated" line per pruned copy is noise here: BatchNorm recalibration logs warnings only."""
    bn_log = logging.getLogger("prunekit.pruning.structured.bn")
    bn_level = bn_log.level
    bn_log.setLevel(max(bn_level, logging.WARNING))
    try:
        yield
    finally:
        bn_log.setLevel(bn_level)


def _group(u: Unit, k: int, n: int, ratios: list[float], scores: dict[str, torch.Tensor], graph: PruningGraph,
           base: dict[str, float], macs0: int, example_inputs: Any, val: list, calib_data: Iterable | None,
           calib_batches: int, recalibrate_bn: bool, device: str | torch.device,
           progress: Callable[[str], None] | None) -> dict[str, Any]:
    """One group at every ratio, each on a fresh copy of the traced graph."""
    results = []
    for r in ratios:
        row: dict[str, Any] = {"ratio": r, "kept": keep_count(u.size, r)}
        sel = select([u], {u.name: scores[u.name]}, r, "local", None, max_ratio=1.0)
        if not sel.count():
            row["error"] = f"ratio {r:g} removes no element of {u.size} (rounds back to full size)"
            results.append(row)
            continue
        try:
            g = copy_graph(graph)
            apply_selection(g, [u], sel)
            pruned = g.model
            if recalibrate_bn and batchnorms(pruned):
                recal(pruned, calib_data, calib_batches, device)
            row["macs_kept"] = count_macs(pruned, to_device(example_inputs, device)) / macs0
            row.update(_evaluate(pruned, val, device))
        except (PruningError, RuntimeError) as e:  # a group whose pruning breaks the forward pass
            row["error"] = f"{type(e).__name__}: {e}"
            results.append(row)
            continue
        row["drop"] = base["top1"] - row["top1"]
        row.pop("samples", None)
        results.append(row)
    drops = [x["drop"] for x in results if "drop" in x]
    grp = {"name": u.name, "layers": list(u.layers), "regex": group_regex(u.layers), "channels": u.channels,
           "results": results, "mean_drop": sum(drops) / len(drops) if drops else None}
    line = (f"sensitivity {k}/{n} {u.name} ({u.channels} ch): drop "
            + " ".join(f"{x['ratio']:g}:{x['drop']:.1f}" if "drop" in x else f"{x['ratio']:g}:err"
                       for x in results))
    log.info(line)
    if progress:
        progress(line)
    return grp


# ----------------------------------------------------------------------------------------------- reading
def read_sensitivity(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A sensitivity result from a ``sensitivity.json`` path (or its folder), or a dict already loaded; checked."""
    import json

    if isinstance(source, Mapping):
        data = dict(source)
        where = "sensitivity result"
    else:
        p = Path(source)
        if p.is_dir():
            p = p / FILES[0]
        if not p.is_file():
            raise RunDirError(f"sensitivity file {str(p)!r} does not exist (write one with `prunekit sensitivity`)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{p} is corrupt: {e}") from None
        where = str(p)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("groups"), list):
        raise RunDirError(f"{where} is not a prunekit sensitivity result (format {FORMAT} with a 'groups' list)")
    for g in data["groups"]:
        if not isinstance(g, dict) or not {"name", "regex", "results"} <= set(g):
            raise RunDirError(f"{where}: every group needs 'name', 'regex' and 'results'; got {g!r:.120}")
    return data


def most_sensitive(result: str | Path | Mapping[str, Any], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` groups with the largest mean top-1 drop over the ratios: ``[(name, mean_drop), ...]``."""
    data = read_sensitivity(result)
    ranked = sorted(((g["name"], g["mean_drop"]) for g in data["groups"] if g.get("mean_drop") is not None),
                    key=lambda t: -t[1])
    return ranked[:k]


def ratio_caps(sensitivity_json: str | Path | Mapping[str, Any], max_drop: float) -> dict[str, float]:
    """Per-group ratio caps: ``{group regex: the largest tested ratio whose top-1 drop, and that of every smaller
    tested ratio, is at most max_drop}``.

    A group that already loses more than ``max_drop`` at the smallest ratio gets ``0.0`` (do not prune it); a
    group within ``max_drop`` at every ratio gets the largest ratio tested (nothing is known beyond it). Ratios
    that could not be tested (``error``) are skipped. The regex names every layer of the group, so it works both
    as an ``only``/``ignore`` pattern and as a ``ratio_overrides`` key (a cap of 0 belongs in ``ignore``).

    Example:
        >>> ratio_caps("runs/base/sensitivity/sensitivity.json", max_drop=1.0)
        {'layer1\\\\.0\\\\.conv1': 0.5, 'conv1|layer1\\\\.0\\\\.conv2|...': 0.1, 'layer3\\\\.2\\\\.conv1': 0.0}
    """
    try:
        max_drop = float(max_drop)
    except (TypeError, ValueError):
        raise ConfigError(f"--max-drop {max_drop!r} is not a number (top-1 points, e.g. 1.0)") from None
    if not max_drop >= 0:
        raise ConfigError(f"--max-drop {max_drop:g} must be >= 0 (top-1 points a single group may cost)")
    caps = {}
    for g in read_sensitivity(sensitivity_json)["groups"]:
        tested = sorted((x for x in g["results"] if "drop" in x), key=lambda x: x["ratio"])
        if not tested:
            continue
        cap = 0.0
        for x in tested:
            if x["drop"] > max_drop:
                break
            cap = float(x["ratio"])
        caps[g["regex"]] = cap
    return caps


# ----------------------------------------------------------------------------------------------- writing
def sensitivity_csv(result: Mapping[str, Any]) -> str:
    """One row per (group, ratio): group, channels, ratio, kept, top1, top5, val_loss, drop, macs_kept, error."""
    buf = io.StringIO()
    cols = ["group", "channels", "ratio", "kept", "top1", "top5", "val_loss", "drop", "macs_kept", "error"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for g in result["groups"]:
        for x in g["results"]:
            w.writerow({"group": g["name"], "channels": g.get("channels"), **x})
    return buf.getvalue()


def plot_sensitivity(result: Mapping[str, Any], path: str | Path, max_curves: int = 40) -> Path:
    """Top-1 vs ratio, one curve per group (the ``max_curves`` most sensitive when there are more)."""
    from prunekit.report.plots import new_figure, save

    groups = result["groups"][:max_curves]
    fig = new_figure(8.0, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for g in groups:
        pts = [(x["ratio"], x["top1"]) for x in g["results"] if "top1" in x]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=g["name"])
    ax.axhline(result["baseline"]["top1"], color="#444444", ls="--", lw=1, label="unpruned")
    ax.set(xlabel="fraction of the group's channels removed", ylabel="top-1 (%)",
           title=f"Layer sensitivity ({result['criterion']}, no fine-tuning"
                 + (", BN recalibrated)" if result.get("recalibrate_bn") else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(groups) > 12 else 1, loc="lower left")
    return save(fig, path)


def write_sensitivity(result: Mapping[str, Any], out: str | Path) -> list[Path]:
    """Write ``sensitivity.json``, ``sensitivity.csv`` and ``sensitivity.png`` into the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / FILES[0], dict(result))
    atomic_write_text(out / FILES[1], sensitivity_csv(result))
    plot_sensitivity(result, out / FILES[2])
    return [out / f for f in FILES]
