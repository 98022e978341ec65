"""``prunekit demo``: the embedded recipe end to end, then baseline vs pruned side by side (``comparison.json``).

Every top-1 in ``comparison.json`` is measured on the dataset's test split (``top1_split: "test"``); the validation
split, carved from the training data, only picked the epochs (``val_top1`` on each side)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.pipeline.recipe import DEMO_RECIPE, load_recipe, recipe_report, run_recipe, stage_dirs

log = logging.getLogger(__name__)


class DemoConfig(Config):
    """``prunekit demo``: train -> prune -> fine-tune -> compare on the embedded default (digits)."""

    out: Path = Field(Path("runs/demo"), description="output directory (replaced on each run unless --resume)")
    resume: bool = Field(False, description="continue an interrupted demo")
    model: str | None = Field(None, description="model (default: the recipe's resnet20)")
    criterion: str | None = Field(None, description="pruning criterion (default: auto, variance with calibration data)")
    target_macs: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to keep (default 0.5)")
    epochs: int | None = Field(None, ge=0, description="baseline epochs (default 12)")
    finetune_epochs: int | None = Field(None, ge=0, description="fine-tuning epochs (default 6)")
    latency_runs: int = Field(30, gt=0, description="timed runs per model for the latency comparison")
    deploy: bool = Field(True, description="also time both models on ONNX Runtime, float32 and int8 (quantized on "
                         "the calib split), next to eager PyTorch (needs the quantize extra)")
    seed: int = Field(0, description="random seed")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str | None) -> str | None:
        from prunekit.models import check_model_name

        return v if v is None else check_model_name(v)


def _overrides(cfg: DemoConfig) -> dict[str, Any]:
    o: dict[str, Any] = {"out": str(cfg.out), "seed": cfg.seed}
    for key, value in (("stages.baseline.model", cfg.model), ("stages.prune.criterion", cfg.criterion),
                       ("stages.prune.target_macs", cfg.target_macs), ("stages.baseline.epochs", cfg.epochs),
                       ("stages.finetune.epochs", cfg.finetune_epochs)):
        if value is not None:
            o[key] = value
    return o


def _clear_previous_demo(out: Path) -> None:
    if not out.exists():
        return
    recipe = out / "recipe.yaml"
    is_demo = recipe.is_file() and (yaml.safe_load(recipe.read_text()) or {}).get("name") == "demo"
    if not is_demo and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists and is not a demo output folder; choose another --out")
    shutil.rmtree(out)


def compare(baseline_dir: Path, pruned_dir: Path, latency_runs: int = 30) -> dict[str, Any]:
    """Baseline vs pruned: metrics from the run directories (top-1 on the test split), latency timed alternately in
    this process."""
    from prunekit.measure.latency import compare_latency

    base, pruned = runs.read_metrics(baseline_dir), runs.read_metrics(pruned_dir)
    for d, m in ((baseline_dir, base), (pruned_dir, pruned)):
        if "test_loss" not in m:  # written by a stage that evaluated on another split (or by an older prunekit)
            log.warning("demo: the top1 of %s is not marked as a test-split figure (no test_loss in its metrics); "
                        "the comparison mixes splits", d)
    mb, mp = runs.load_model(baseline_dir), runs.load_model(pruned_dir)
    x = runs.example_inputs(mb.prunekit_spec, 1)
    lat = compare_latency({"baseline": mb, "pruned": mp}, x, backend="eager", runs=latency_runs, threads=2)
    base = {**base, "latency_ms": lat["baseline"].median_ms}
    pruned = {**pruned, "latency_ms": lat["pruned"].median_ms}
    return {
        "macs_reduction": 1 - pruned["macs"] / base["macs"],
        "params_reduction": 1 - pruned["params"] / base["params"],
        "top1_drop": base["top1"] - pruned["top1"],
        "top1_split": "test",
        "latency_reduction": 1 - pruned["latency_ms"] / base["latency_ms"],
        "latency": {k: v.to_dict(with_times=False) for k, v in lat.items()},
        "baseline": {"run_dir": str(baseline_dir), **base},
        "pruned": {"run_dir": str(pruned_dir), **pruned},
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the embedded demo recipe and write ``OUT/comparison.json``. Returns the comparison."""
    if not cfg.resume:
        _clear_previous_demo(Path(cfg.out))
    recipe = load_recipe(DEMO_RECIPE, _overrides(cfg))
    run_recipe(recipe, resume=cfg.resume)
    dirs = stage_dirs(recipe)
    result = compare(dirs["baseline"], dirs[list(recipe.stages)[-1]], cfg.latency_runs)
    if cfg.deploy:
        result["deployment"] = deployment(dirs["baseline"], dirs[list(recipe.stages)[-1]], Path(cfg.out) / "deploy",
                                          cfg.latency_runs)
    atomic_write_json(Path(cfg.out) / "comparison.json", result)
    html = recipe_report(recipe)
    if html is not None:
        result["report"] = str(html)
    return result


def deployment(baseline_dir: Path, pruned_dir: Path, out: Path, latency_runs: int = 30,
               threads: int = 2) -> dict[str, Any] | None:
    """Baseline and pruned on the deployment runtime: exported to ONNX, quantized int8 for ONNX Runtime (calib
    split; top-1 of both on the test split), then eager float32, ONNX Runtime float32 and int8 timed side by side at
    batch 1. ``None`` (logged) when the quantize extra is not installed."""
    import importlib.util

    if any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxruntime")):
        log.warning("demo: onnxruntime is not installed; no deployment latency (pip install 'prunekit[quantize]')")
        return None
    from prunekit.pipeline.stages import loaders
    from prunekit.quantize import quantize
    from prunekit.quantize.latency import Variant, side_by_side

    ld = loaders(runs.read_config(baseline_dir), 64, splits=("calib", "test"))
    variants, accuracy = [], {}
    for name, d in (("dense", baseline_dir), ("pruned", pruned_dir)):
        model = runs.load_model(d).eval()
        x = runs.example_inputs(model.prunekit_spec, 1)
        rep = quantize(model, x, "onnxruntime", calib_data=ld["calib"], out=out / name, eval_data=ld["test"],
                       calib_batches=4, threads=threads)
        variants += [Variant(name, "eager", "float32", model), Variant(name, "onnxruntime", "float32", rep.float_path),
                     Variant(name, "onnxruntime", "int8", rep.int8_path)]
        accuracy[name] = {"top1_float": rep.accuracy_float["top1"], "top1_int8": rep.accuracy_int8["top1"]}
    spec = variants[0].source.prunekit_spec
    rows = side_by_side(variants, lambda b: runs.example_inputs(spec, b), (1,), latency_runs, 3, 10, threads)
    ms = {(r["model"], r["runtime"], r["precision"]): r["median_ms"] for r in rows}
    reduction = {f"{rt} {p}": 1 - ms[("pruned", rt, p)] / ms[("dense", rt, p)] for _, rt, p in ms}
    return {"threads": threads, "batch": 1, "rows": rows, "accuracy": accuracy, "latency_reduction": reduction,
            "pruned_int8_vs_dense_eager": ms[("dense", "eager", "float32")] / ms[("pruned", "onnxruntime", "int8")]}
