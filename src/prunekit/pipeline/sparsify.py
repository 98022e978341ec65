"""``prunekit sparsify``: unstructured / N:M / kernel / pattern pruning of a run directory's model.

Example::

    prunekit sparsify --from runs/base --method global --sparsity 0.8 --epochs 2 --out runs/sparse80
    prunekit sparsify --from runs/pruned --method nm --nm 2:4 --epochs 1 --out runs/pruned-24
    prunekit sparsify --from runs/base --method movement --sparsity 0.9 --schedule gradual --epochs 5 --out runs/mvp
    prunekit sparsify --from runs/base --method l1 --sparsity 0.9 --schedule iterative --steps 3 --epochs 1 --out r

The output folder holds the standard run files (the masks are ``weight_mask`` buffers in ``model.safetensors``,
re-attached on load; ``--permanent`` folds them into the weights) plus ``sparsity_report.json`` (per-layer sparsity,
storage, MACs, 2:4 latency where measured). The first layer and the classifier stay dense unless
``--no-dense-first-last``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config, section
from prunekit.data import DataArgs
from prunekit.errors import ConfigError
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pipeline.stages import loaders, test_metrics
from prunekit.pruning.llm.stream_io import StreamConfig
from prunekit.pruning.structured import recalibrate_bn
from prunekit.pruning.structured.bn import batchnorms
from prunekit.pruning.unstructured import (
    GradualSchedule,
    Sparsifier,
    SparsifySettings,
    get_method,
    iterative_targets,
    measure_2to4_latency,
)
from prunekit.train import TrainSettings, evaluate, fit

log = logging.getLogger("prunekit.sparsify")
REPORT = "sparsity_report.json"


class SparsifyConfig(Config):
    """``prunekit sparsify``: unstructured pruning of a run directory's model, optionally with fine-tuning
    (sections ``sparsify``: what is pruned, ``train``: the fine-tuning, ``data``)."""

    shared_keys = ("seed",)
    from_dir: Path = Field(alias="from", description="run directory of the model to sparsify")
    out: Path = Field(Path("runs/sparsify"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    resume: bool = Field(False, description="continue an interrupted run in --out")
    seed: int = Field(0, description="random seed (random method, data order, fine-tuning)")
    schedule: Literal["oneshot", "iterative", "gradual"] = Field(
        "oneshot", description="oneshot: prune once, then fine-tune --epochs; iterative: --steps x (prune, fine-tune "
        "--epochs); gradual: cubic schedule during --epochs of training")
    steps: int = Field(3, ge=1, description="iterative: pruning steps")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="gradual: sparsity s_i at the start")
    gradual_end: float = Field(0.75, gt=0, le=1, description="gradual: fraction of the training steps at which the "
                               "final sparsity is reached (the rest recovers at it)")
    prune_every: int | None = Field(None, ge=1, description="gradual: optimizer steps between mask updates "
                                    "(default: 20 updates over the ramp)")
    recalibrate_bn: bool = Field(True, description="re-estimate BatchNorm statistics on --calib-batches clean "
                                 "batches after each pruning step")
    permanent: bool = Field(False, description="fold the masks into the weights (no mask buffers; the zeros are "
                            "no longer held during later training)")
    measure_latency: bool = Field(True, description="nm 2:4: time dense vs 2:4 on sparse tensor cores where CUDA "
                                  "on an Ampere or newer GPU is present")
    calib_text: Path | None = Field(None, description="causal LM folder (--from with config.json + safetensors): "
                                    "training text the calibration windows of wanda / sparsegpt are drawn from")
    eval_text: Path | None = Field(None, description="causal LM folder: perplexity before and after on this text")
    calib_samples: int = Field(128, gt=0, description="causal LM folder: calibration windows of --seq-len tokens")
    seq_len: int = Field(256, ge=2, description="causal LM folder: tokens per calibration / evaluation window")
    tokenizer: str = Field("auto", description="causal LM folder: auto (the folder's tokenizer, else bytes for a "
                           "vocab-256 model), bytes, or a tokenizer folder")
    sparsify: SparsifySettings = section(SparsifySettings, "what is pruned")
    train: TrainSettings = section(TrainSettings, "the fine-tuning (--epochs: iterative per step, gradual in all)",
                                   epochs=0, lr=0.01)
    data: DataArgs = section(DataArgs, "the data")
    stream: StreamConfig = section(StreamConfig, "causal LM folder: one decoder layer at a time (llm_stream.py)")

    @model_validator(mode="after")
    def _consistent(self) -> SparsifyConfig:
        try:
            self.sparsify.check_consistent("sparsify")
            self._schedule_fits()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def _schedule_fits(self) -> None:
        sp, epochs, source = self.sparsify, self.train.epochs, "sparsify"
        if get_method(sp.method).needs == "training" and (self.schedule != "gradual" or epochs < 1):
            raise ConfigError(f"{source}: method {sp.method!r} scores weights while they train, so it needs a "
                              f"training phase: use --schedule gradual with --epochs >= 1 (got --schedule "
                              f"{self.schedule}, --epochs {epochs})")
        if self.schedule != "oneshot" and sp.structure in ("nm", "pattern"):
            raise ConfigError(f"{source}: method {sp.method!r} has a fixed pattern and prunes in one step: use "
                              "--schedule oneshot (add --epochs N to fine-tune with the masks fixed)")
        if self.schedule in ("iterative", "gradual") and epochs < 1:
            raise ConfigError(f"{source}: --schedule {self.schedule} fine-tunes between pruning steps and needs "
                              "--epochs >= 1; without training use --schedule oneshot")
        if self.schedule == "gradual" and self.initial_sparsity > sp.target():
            raise ConfigError(f"{source}: --initial-sparsity {self.initial_sparsity} is above --sparsity "
                              f"{sp.target()}")


def _settings(cfg: SparsifyConfig) -> SparsifySettings:
    return cfg.sparsify


@register("sparsify", SparsifyConfig, help="Unstructured / N:M / kernel pruning of a run directory's model (masks)",
          stage="sparsify", trains=True)
def sparsify_run(cfg: SparsifyConfig) -> dict[str, Any]:
    """Load ``cfg.from_dir``, sparsify on ``cfg.schedule`` (fine-tuning with fixed masks), report, write ``cfg.out``.

    Returns the metrics written to ``metrics.json``. A Hugging Face causal LM folder (``config.json`` +
    safetensors) goes to ``prunekit.pipeline.llm_sparse`` (wanda / sparsegpt, calibration from ``--calib-text``).
    """
    from prunekit.pipeline.llm import is_hf_folder

    if is_hf_folder(cfg.from_dir):
        from prunekit.pipeline.llm_sparse import sparsify_llm_run

        return sparsify_llm_run(cfg)
    if cfg.stream.stream:
        raise ConfigError(f"--stream: --from {str(cfg.from_dir)!r} is a run directory; streaming reads a "
                          "Hugging Face causal LM folder (config.json + safetensors) one layer at a time; drop it")
    s, d = cfg.sparsify, cfg.data
    with stage_run(cfg, "sparsify", resumable=True) as run:
        out, data, device, before = run.out, run.data, run.device, run.before
        x = run.example_inputs()
        ld = loaders(data, d.batch_size, cfg.seed, d.workers, d.download,
                     splits=("train", "calib", "val", "test") if cfg.train.epochs else ("calib", "test"))
        log.info("sparsify: %s from %s (top1 %.2f%%): %s to %.4f, %s schedule, %d epochs", run.spec.name,
                 cfg.from_dir, before.get("top1", float("nan")), s.method, s.target(), cfg.schedule, cfg.train.epochs)
        t0 = time.perf_counter()
        retention: list[dict[str, Any]] = []
        sp = _sparsify(cfg, Sparsifier(run.model, _settings(cfg), x, calib_data=ld["calib"], device=device), ld,
                       out, retention)
        seconds = time.perf_counter() - t0
        model, spec = sp.model, sp.model.prunekit_spec  # a resumed iterative run reloaded the model
        report = sp.report(x)
        if s.structure == "nm" and cfg.measure_latency:
            _latency_2to4(cfg, report, model, runs.example_inputs(spec, d.batch_size, device))
        sp.finalize(permanent=cfg.permanent)
        metrics = {**test_metrics(model, ld["test"], device), **report.metrics(), "schedule": cfg.schedule,
                   "permanent": cfg.permanent, "retention": retention, "top1_before": before.get("top1"),
                   "sparsify_seconds": round(seconds, 2), "stage": "sparsify", "from": str(cfg.from_dir), **data}
        if report.latency and report.latency.get("measured"):
            metrics.update(latency_dense_ms=report.latency["dense_ms"], latency_2to4_ms=report.latency["sparse_ms"])
        log.info("sparsify: report\n%s", report.table())
        log.info("sparsify: done: top1 %.2f%% (was %.2f%%), sparsity %.4f, %d of %d parameters non-zero",
                 metrics["top1"], before.get("top1", float("nan")), report.sparsity, report.nonzero_params,
                 report.params)
        runs.save_model(out, model.to("cpu"), spec)
        metrics["size_file"] = (out / runs.WEIGHTS).stat().st_size
        runs.write_config(out, {**cfg.to_dict(), **data})
        runs.write_metrics(out, metrics)
        atomic_write_json(out / REPORT, report.to_dict())
    return metrics


def _sparsify(cfg: SparsifyConfig, sp: Sparsifier, ld: dict[str, Any], out: Path,
              retention: list[dict[str, Any]]) -> Sparsifier:
    """Prune (and fine-tune) on ``cfg.schedule``; each pruning step's test figures are appended to ``retention``.
    Returns the sparsifier (a resumed iterative run holds a reloaded model)."""
    device, calib, s, t = cfg.train.device, ld["calib"], cfg.sparsify, cfg.train

    def pruned(sp: Sparsifier, step: int) -> None:
        """BatchNorm recalibration and an evaluation right after a pruning step (before any fine-tuning)."""
        if cfg.recalibrate_bn and batchnorms(sp.model):
            recalibrate_bn(sp.model, calib, s.calib_batches, device)
        m = evaluate(sp.model, ld["test"], device)  # reported: the test split
        row = {"step": step, "sparsity": sp.sparsity(), "top1": m["top1"], "top5": m["top5"]}
        retention.append(row)
        runs.append_history(out, {"phase": "sparsify-prune", **row})
        log.info("sparsify step %d: sparsity %.4f, top1 %.2f%% before fine-tuning", step, row["sparsity"],
                 m["top1"])

    def train(callbacks: list[Any], run_dir: Path, phase: str) -> None:
        fit(callbacks[0].model, ld["train"], ld["val"], t, run_dir=run_dir, resume=cfg.resume,
            callbacks=callbacks, phase=phase)

    if cfg.schedule == "oneshot":
        sp.step()
        pruned(sp, 1)
        if t.epochs:
            train([sp], out, "sparsify-finetune")
        return sp
    if cfg.schedule == "iterative":
        return _iterative(cfg, sp, out, pruned, train)
    recal = None
    if cfg.recalibrate_bn and batchnorms(sp.model):
        def recal(m: torch.nn.Module) -> None:
            recalibrate_bn(m, calib, s.calib_batches, device)
    sched = GradualSchedule(sp, t.epochs * len(ld["train"]), s.target(), cfg.initial_sparsity, 0.0,
                            cfg.gradual_end, cfg.prune_every, recalibrate=recal)
    sched.start()
    train([sp, sched], out, "sparsify-gradual")
    sched.finish()
    return sp


def _latency_2to4(cfg: SparsifyConfig, report: Any, model: torch.nn.Module, inputs: Any) -> None:
    """``report.latency``: dense vs 2:4 timing on sparse tensor cores (``--nm 2:4`` only), with a note when none."""
    nm = cfg.sparsify.nm
    report.latency = measure_2to4_latency(model, inputs) if nm == "2:4" else {
        "measured": False, "reason": f"sparse tensor cores accelerate 2:4 only, not {nm}"}
    if not report.latency.get("measured"):
        report.notes.append(f"no 2:4 speed-up claimed: {report.latency['reason']}")


def _iterative(cfg: SparsifyConfig, sp: Sparsifier, out: Path, pruned: Any, train: Any) -> Sparsifier:
    """``--steps`` x (prune, fine-tune); each finished step is saved under ``OUT/steps/`` so ``--resume`` continues
    after it (the folder is removed at the end)."""
    import shutil

    steps_dir = out / "steps"
    targets, device = iterative_targets(cfg.sparsify.target(), cfg.steps), cfg.train.device
    start = 1
    done = sorted(int(p.name.split("-")[0]) for p in steps_dir.glob("*-done")) if cfg.resume else []
    if done:
        model = runs.load_model(steps_dir / f"{done[-1]}-done", device)  # masks come back with it
        sp = Sparsifier(model, sp.settings, sp.example_inputs, calib_data=sp.calib_data, device=device)
        sp.current, start = targets[done[-1] - 1], done[-1] + 1
        log.info("sparsify: resuming after iterative step %d/%d", done[-1], cfg.steps)
    for k in range(start, cfg.steps + 1):
        log.info("sparsify iterative step %d/%d: sparsity %.4f", k, cfg.steps, targets[k - 1])
        sp.step(targets[k - 1])
        pruned(sp, k)
        train([sp], steps_dir / str(k), f"sparsify-step{k}")
        for row in runs.read_history(steps_dir / str(k)):
            runs.append_history(out, row)
        sp.finalize()
        runs.save_model(steps_dir / f"{k}-done", sp.model)
    shutil.rmtree(steps_dir, ignore_errors=True)
    return sp
