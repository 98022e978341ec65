"""Pruning-aware training (PAT): N steps of (statistics on the current model -> prune -> BN recalibration ->
retention -> E epochs of fine-tuning). One-shot pruning is N = 1 with E = 0.

The schedule says how much is kept after step i, as a fraction of the ORIGINAL model: geometric
``keep^(i/N)`` or linear ``1 - (1 - keep) * i/N``, where keep is ``1 - ratio`` (prunable channels) or
``target_macs`` (MACs). Each step converts that into the ratio (or MAC target) relative to the current model, so the
last step lands on the final target exactly as a one-shot prune would. After each step the pruned model is saved
under ``OUT/steps/`` so ``--resume`` continues from the last finished step; the folder is removed at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from prunekit import runs
from prunekit.config import Config, section
from prunekit.data import DataArgs
from prunekit.errors import ConfigError
from prunekit.measure import count_macs
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pipeline.stages import KDArgs, kd_setup, loaders, model_metrics, test_metrics, write_run
from prunekit.pruning.structured import StructuredConfig, prune_with_settings, recalibrate_bn
from prunekit.pruning.structured.bn import batchnorms
from prunekit.train import TrainSettings, fit

log = logging.getLogger(__name__)


class PATConfig(Config):
    """``pat`` recipe stage: pruning-aware training. Sections: ``prune`` (each step's pruning; its ratio / keep /
    target_macs is the final target), ``train`` (each step's fine-tuning), ``kd``, ``data``."""

    shared_keys = ("seed",)
    from_dir: Path = Field(alias="from", description="run directory of the model to prune")
    steps: int = Field(5, ge=1, description="pruning steps")
    schedule: Literal["geometric", "linear"] = Field("geometric", description="how the kept fraction shrinks")
    bn_batches: int = Field(50, ge=0, description="batches for BatchNorm recalibration after each step (0: off)")
    resume: bool = Field(False, description="continue from the last finished step")
    out: Path = Field(Path("runs/pat"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    seed: int = Field(0, description="random seed (data order, pruning, fine-tuning)")
    prune: StructuredConfig = section(StructuredConfig, "each step's pruning")
    train: TrainSettings = section(TrainSettings, "each step's fine-tuning (--epochs after each pruning step)",
                                   epochs=1, lr=0.01)
    kd: KDArgs = section(KDArgs, "distillation")
    data: DataArgs = section(DataArgs, "the data")


def kept_after(step: int, steps: int, keep: float, schedule: str) -> float:
    """Fraction of the original kept after ``step`` of ``steps`` (1-based)."""
    if schedule == "geometric":
        return keep ** (step / steps)
    return 1.0 - (1.0 - keep) * step / steps


def prunable_channels(model: torch.nn.Module, example_inputs: Any, s: StructuredConfig) -> int:
    """Size of the channel pool the engine's ``ratio`` refers to (all prunable non-attention channels)."""
    from prunekit.pruning.structured.graph import PruningGraph
    from prunekit.pruning.structured.plan import plan_units

    units = plan_units(PruningGraph(model, example_inputs), s)
    return sum(u.size for u in units if u.attention is None)


def step_settings(cfg: PATConfig, step: int, model: torch.nn.Module, x: Any, pool0: int,
                  macs0: int) -> StructuredConfig:
    """The engine settings of one step: a ratio (or MAC target) relative to the current model."""
    p = cfg.prune
    if p.target.macs is not None:
        want = kept_after(step, cfg.steps, p.target.macs, cfg.schedule) * macs0
        update = {"target_macs": min(0.999, want / count_macs(model, x)), "ratio": None}
    else:
        want = round(kept_after(step, cfg.steps, 1.0 - p.global_ratio, cfg.schedule) * pool0)
        cur = prunable_channels(model, x, p)
        if want >= cur:
            raise ConfigError(f"pat step {step}: nothing left to prune ({cur} channels, target {want}); "
                              "use fewer --steps or a larger --ratio")
        update = {"ratio": 1.0 - want / cur, "target_macs": None}
    return p.updated(update, source=f"pat step {step}")


@register("pat", PATConfig, help="Pruning-aware training of a run directory's model: --steps x (prune, BN "
          "recalibration, fine-tune --epochs)", stage="pat", trains=True)
def pat(cfg: PATConfig) -> dict[str, Any]:
    """Run pruning-aware training from ``cfg.from_dir`` and write a run directory. Returns its metrics."""
    with stage_run(cfg, "pat", resumable=True) as run:
        out, data, model, spec = run.out, run.data, run.model, run.spec
        steps_dir = out / "steps"
        x = run.example_inputs()
        pool0 = prunable_channels(model, x, cfg.prune)
        macs0 = count_macs(model, x)
        t, d = cfg.train, cfg.data
        ld = loaders(data, d.batch_size, cfg.seed, d.workers, d.download, splits=("train", "calib", "val", "test"))
        loss_fn, teacher_dir = kd_setup(cfg, "pat")
        start, retention = 1, []
        if cfg.resume and steps_dir.is_dir():
            done = sorted(int(p.name.split("-")[0]) for p in steps_dir.glob("*-done"))
            if done:
                start = done[-1] + 1
                model = runs.load_model(steps_dir / f"{done[-1]}-done", t.device)
                retention = runs.read_metrics(steps_dir / f"{done[-1]}-done")["retention"]
                log.info("pat: resuming after step %d/%d", done[-1], cfg.steps)
        t0 = time.perf_counter()
        for step in range(start, cfg.steps + 1):
            model, r = _prune_step(cfg, step, model, x, pool0, macs0, ld, out)
            if t.epochs:
                fit(model, ld["train"], ld["val"], t, run_dir=steps_dir / f"{step}", resume=cfg.resume,
                    phase=f"pat-step{step}", loss_fn=loss_fn)
                _merge_history(steps_dir / f"{step}", out)
            retention = [*retention, {"step": step, "top1": r["top1"], "macs": r["macs"]}]
            runs.save_model(steps_dir / f"{step}-done", model)
            runs.write_metrics(steps_dir / f"{step}-done", {"retention": retention})
        metrics = {**test_metrics(model, ld["test"], t.device), **model_metrics(model, spec, t.device),
                   "retention": retention, "stage": "pat", "from": str(cfg.from_dir),
                   "train_seconds": round(time.perf_counter() - t0, 2),
                   **({"teacher": str(teacher_dir)} if teacher_dir else {}), **data}
        log.info("pat: done: top1 %.2f%%, MACs %.2f M (%.1f%% of the original)", metrics["top1"],
                 metrics["macs"] / 1e6, 100 * metrics["macs"] / macs0)
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
        shutil.rmtree(steps_dir, ignore_errors=True)
    return metrics


def _prune_step(cfg: PATConfig, step: int, model: torch.nn.Module, x: Any, pool0: int, macs0: int,
                ld: dict[str, Any], out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Step ``step``'s pruning and BatchNorm recalibration, saved under ``OUT/steps/<step>-pruned`` (a resumed run
    reloads it); returns the model and its retention record (test top-1 right after pruning, MACs)."""
    pruned_dir, device = out / "steps" / f"{step}-pruned", cfg.train.device
    if cfg.resume and (pruned_dir / runs.WEIGHTS).is_file():
        return runs.load_model(pruned_dir, device), runs.read_metrics(pruned_dir)
    # BatchNorm is recalibrated below, on its own --bn-batches
    s = step_settings(cfg, step, model, x, pool0, macs0).updated({"recalibrate_bn": False})
    log.info("pat step %d/%d: prune %s", step, cfg.steps, f"to {s.target.macs:.3f} of the current MACs"
             if s.target.macs else f"ratio {s.target.ratio:.4f}")
    report = prune_with_settings(model, x, s, calib_data=ld["calib"], device=device)
    if cfg.bn_batches and batchnorms(model):
        recalibrate_bn(model, ld["calib"], cfg.bn_batches, device)
    r = {**test_metrics(model, ld["test"], device), "step": step, "macs": report.macs_after,
         "macs_kept_total": report.macs_after / macs0}
    log.info("pat step %d/%d: retention top1 %.2f%% at %.1f%% of the MACs", step, cfg.steps, r["top1"],
             100 * r["macs_kept_total"])
    runs.save_model(pruned_dir, model)
    runs.write_metrics(pruned_dir, r)
    runs.append_history(out, {"phase": "pat-prune", "step": step, "retention_top1": r["top1"],
                              "retention_top5": r["top5"], "macs": r["macs"]})
    return model, r


def _merge_history(step_dir: Path, out: Path) -> None:
    """Fold one step's history lines into the stage's history.jsonl."""
    for row in runs.read_history(step_dir):
        runs.append_history(out, row)
    (step_dir / runs.HISTORY).unlink(missing_ok=True)
