"""``prunekit prune``: prune the model of a run directory and write a new run directory.

Example::

    prunekit prune --from runs/base --criterion l1 --ratio 0.35 --out runs/pruned
    prunekit prune --from runs/base --criterion taylor --target-macs 0.6 --calib-batches 20 --out runs/pruned
    prunekit prune --from runs/base --criterion l1 --ratio 0.5 --sensitivity runs/base/sensitivity --max-drop 1.0

The output folder holds the standard run files plus ``prune_report.json`` (the full ``PruneReport``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config
from prunekit.data import DataArgs
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pipeline.stages import loaders, test_metrics
from prunekit.pruning.structured import StructuredConfig, prune_with_settings

log = logging.getLogger("prunekit.prune")
REPORT = "prune_report.json"


class PruneConfig(Config):
    """``prunekit prune``: structured pruning of a run directory's model. Composed of the stage's own options, the
    data section (``DataArgs``) and the pruning section (``StructuredConfig``); flags and YAML keys are their flat
    keys (``--criterion``, ``--target-macs``, ``--compensate``, ``--dataset`` ...)."""

    shared_keys = ("seed",)
    from_dir: Path = Field(alias="from", description="run directory of the model to prune")
    out: Path = Field(Path("runs/prune"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    seed: int = Field(0, description="random seed (data order, the random criterion, reconstruction)")
    sensitivity: Path | None = Field(None, description="a sensitivity.json (prunekit sensitivity) turned into "
                                     "per-layer ratio caps with --max-drop")
    max_drop: float = Field(1.0, ge=0, description="with --sensitivity: a group may lose at most the largest tested "
                            "ratio that cost it at most this many top-1 points")
    prune: StructuredConfig = Field(default_factory=StructuredConfig, description="the pruning")
    data: DataArgs = Field(default_factory=DataArgs, description="the data (calibration and evaluation)")


@register("prune", PruneConfig, help="Prune the model of a run directory (structured: channels, heads)",
          stage="prune")
def prune_run(cfg: PruneConfig) -> dict[str, Any]:
    """Load ``cfg.from_dir``, prune, optionally recalibrate BatchNorm, evaluate, write ``cfg.out``.

    Returns the metrics written to ``metrics.json``.
    """
    from prunekit.pipeline import detect

    if detect.is_detection(cfg, cfg.from_dir):  # a detector: calibration on images, mAP on the test split
        return detect.prune_detect(cfg)
    p = cfg.prune
    with stage_run(cfg, "prune") as run:
        out, data, device, model, spec, before = run.out, run.data, run.device, run.model, run.spec, run.before
        x = run.example_inputs()
        ld = loaders(data, cfg.data.batch_size, cfg.seed, cfg.data.workers, cfg.data.download,
                     splits=("calib", "test"))
        calib = ld["calib"]
        goal = f"target_macs {p.target.macs}" if p.target.macs is not None else f"ratio {p.global_ratio}"
        if p.target.latency is not None:
            goal = f"target_latency {p.target.latency} ({p.latency.backend})"
        log.info("prune: %s from %s (top1 %.2f%%), %s %s, %s", spec.name, cfg.from_dir,
                 before.get("top1", float("nan")), p.criterion, p.layers.scope, goal)
        t0 = time.perf_counter()
        report = prune_with_settings(model, x, _with_caps(cfg), calib_data=calib, device=device)  # BN recalibrated
        seconds = time.perf_counter() - t0
        metrics = {**test_metrics(model, ld["test"], device), "macs": report.macs_after, "params": report.params_after,
                   "macs_before": report.macs_before, "params_before": report.params_before,
                   "macs_kept": report.macs_kept, "params_kept": report.params_kept, "ratio": report.ratio,
                   "target_macs": p.target.macs, "target_latency": p.target.latency,
                   "latency": {k: v for k, v in report.latency.items() if k != "per_layer"},
                   "criterion": report.criterion, "scope": p.layers.scope, "compensate": report.compensate,
                   "groups_pruned": report.groups_pruned, "groups_left_whole": len(report.left_whole),
                   "bn_recalibration_batches": report.bn_recalibration.get("batches", 0),
                   "top1_before": before.get("top1"), "prune_seconds": round(seconds, 2), "stage": "prune",
                   "from": str(cfg.from_dir), **data}
        log.info("prune: done: top1 %.2f%% (was %.2f%%), MACs %.2f M -> %.2f M (%.1f%% kept), params %.1f K",
                 metrics["top1"], before.get("top1", float("nan")), report.macs_before / 1e6,
                 report.macs_after / 1e6, 100 * report.macs_kept, report.params_after / 1e3)
        runs.save_model(out, model.to("cpu"), spec)
        runs.write_config(out, {**cfg.to_dict(), **data})
        runs.write_metrics(out, metrics)
        atomic_write_json(out / REPORT, report.to_dict())
    return metrics


def _with_caps(cfg: PruneConfig) -> StructuredConfig:
    """The pruning section, with the per-group ratio caps of ``--sensitivity`` / ``--max-drop`` when given."""
    if cfg.sensitivity is None:
        return cfg.prune
    from prunekit.report.sensitivity import ratio_caps

    caps = ratio_caps(cfg.sensitivity, cfg.max_drop)
    log.info("prune: %d per-group ratio caps from %s (max drop %g points), %d of them 0", len(caps),
             cfg.sensitivity, cfg.max_drop, sum(c == 0 for c in caps.values()))
    return cfg.prune.updated({"ratio_caps": {**caps, **cfg.prune.layers.ratio_caps}})
