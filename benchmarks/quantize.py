"""Prune, then quantize: four variants side by side on the CPU runtimes that ship them.

Latency (random weights): torchvision ResNet-50 and MobileNetV3-Large, dense and pruned with
``prunekit.prune(model, x, "l2", target_macs=0.5, round_to=16)``; each exported once to float ONNX and quantized
(static int8, per-channel weights, random calibration batches) for ONNX Runtime (QDQ) and OpenVINO (NNCF). All
variants of a model and batch size (eager float32 dense / pruned, and dense fp32, pruned fp32, dense int8, pruned
int8 on each runtime) are timed *alternately* in one run (``prunekit.quantize.latency.paired_times``): rounds of
A B C ... then ... C B A, so a drifting machine slows all alike. Medians and the spread of per-round medians.

Accuracy: a ResNet-20 trained on Fashion-MNIST (``prunekit train``, cached under ~/.cache/prunekit/bench/quantize),
pruned to 50% MACs by prunekit (l2, round_to 16) and, as the anchor, by torch-pruning's MetaPruner +
GroupMagnitudeImportance at the same MACs, both fine-tuned alike; then ``prunekit quantize`` of the dense and both
pruned models for each runtime (test top-1 of float32 and int8 on the same runtime), and ``prunekit finetune --qat``
where post-training int8 loses more than 0.5 point. Epochs are picked on the val split, figures are on the test split.

Usage::

    .venv/bin/python benchmarks/quantize.py                                   # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/quantize.py --models resnet50 --batches 1 --runs 20 --no-accuracy
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantize.py --models "" --json out.json   # the accuracy part only
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit import count_macs, create_model, runs
from prunekit.quantize.graph import export_float
from prunekit.quantize.latency import eager_call, file_call, paired_times, round_spread

MODELS = {"resnet50": "tv:resnet50", "mobilenetv3": "tv:mobilenet_v3_large"}
CACHE = Path.home() / ".cache" / "prunekit" / "bench" / "quantize"
# the accuracy model: ResNet-20 on Fashion-MNIST (28 px), 15 000 training images, 8 epochs (about 10 min on one core)
BASE_TRAIN = ("--model", "resnet20", "--dataset", "fashion-mnist", "--epochs", "8", "--lr", "0.1", "--batch-size",
              "128", "--train-samples", "15000")
RUNTIMES = ("onnxruntime", "openvino")
PRUNEKIT = [sys.executable, "-m", "prunekit"]


def build(name: str, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = create_model(MODELS[name], num_classes=1000).eval()
    pruned = copy.deepcopy(dense)
    prunekit.prune(pruned, x, "l2", target_macs=0.5, round_to=16)
    return {"dense": dense, "pruned": pruned.eval()}


def files(models: dict[str, torch.nn.Module], x: torch.Tensor, tmp: Path, threads: int) -> dict[tuple, str]:
    """(runtime, precision, variant) -> model file: one float ONNX export per model, int8 for each runtime."""
    calib = [torch.randn(4, *x.shape[1:]) for _ in range(2)]
    out = {}
    for variant, model in models.items():
        onnx = tmp / f"{variant}.onnx"
        export_float(model, x, onnx)
        for rt in RUNTIMES:
            r = prunekit.quantize(onnx, backend=rt, calib_data=calib, calib_batches=2, out=tmp / f"{variant}_{rt}",
                                  threads=threads)
            out[(rt, "fp32", variant)], out[(rt, "int8", variant)] = r.float_path, r.int8_path
    return out


def time_model(name: str, batches: list[int], runs: int, threads: int) -> list[dict[str, Any]]:
    x = torch.randn(1, 3, 224, 224)
    models = build(name, x)
    macs = {v: count_macs(m, x) for v, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        paths = files(models, x, Path(tmp), threads)
        for batch in batches:
            xb = torch.randn(batch, 3, 224, 224)
            fns = {("eager", "fp32", v): eager_call(m, xb) for v, m in models.items()}
            fns.update({key: file_call(p, xb, threads) for key, p in paths.items()})
            stats = paired_times({"/".join(k): f for k, f in fns.items()}, batch_size=batch, runs=runs, warmup=2,
                                 rounds=5, threads=threads)
            for (rt, prec, v) in fns:
                s = stats[f"{rt}/{prec}/{v}"]
                lo, hi = round_spread(s)
                rows.append({"model": name, "batch": batch, "runtime": rt, "precision": prec, "variant": v,
                             "macs": macs[v], "median_ms": s.median_ms, "round_min_ms": lo, "round_max_ms": hi})
            del fns, stats
    ref = {(r["model"], r["batch"]): r["median_ms"] for r in rows
           if (r["runtime"], r["precision"], r["variant"]) == ("onnxruntime", "fp32", "dense")}
    for r in rows:
        r["speedup_vs_ort_dense_fp32"] = ref[(r["model"], r["batch"])] / r["median_ms"]
    return rows


def print_latency(rows: list[dict[str, Any]]) -> None:
    print("\n| model | batch | runtime | variant | MACs (G) | median ms | round medians ms | x vs ORT dense fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['runtime']} | {r['variant']} {r['precision']} | "
              f"{r['macs'] / 1e9:.2f} | {r['median_ms']:.1f} | {r['round_min_ms']:.1f}-{r['round_max_ms']:.1f} | "
              f"{r['speedup_vs_ort_dense_fp32']:.2f} |")


def cli(*args: str) -> None:
    subprocess.run([*PRUNEKIT, *args], check=True, stdout=subprocess.DEVNULL)


def stage(out: Path, *args: str) -> dict[str, Any]:
    """Run ``prunekit ARGS --out OUT`` unless ``out`` already holds a finished run; its metrics."""
    if not (out / runs.METRICS).is_file():
        cli(*args, "--out", str(out), "--overwrite")
    return runs.read_metrics(out)


def tp_prune(base: Path, macs: int, out: Path) -> None:
    """The anchor: torch-pruning's MetaPruner + GroupMagnitudeImportance (L2, its defaults: local, uniform ratio),
    the ratio bisected to ``macs``; written as a run directory that ``prunekit finetune`` reads."""
    import torch_pruning as tp

    if (out / runs.METRICS).is_file():
        return
    dense = runs.load_model(base).eval()
    x = runs.example_inputs(dense.prunekit_spec, 1, "cpu")
    lo, hi, best = 0.0, 0.9, None
    for _ in range(14):
        r = (lo + hi) / 2
        m = copy.deepcopy(dense)
        head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
        tp.pruner.MetaPruner(m, x, tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=r,
                             ignored_layers=head).step()
        kept = count_macs(m, x)
        if best is None or abs(kept - macs) < abs(best[1] - macs):
            best = (m, kept)
        lo, hi = (r, hi) if kept > macs else (lo, r)
    out.mkdir(parents=True, exist_ok=True)
    prunekit.save_model(out, best[0])
    shutil.copy(base / runs.CONFIG, out / runs.CONFIG)
    (out / runs.LOG).write_text(f"torch-pruning {tp.__version__} MetaPruner GroupMagnitudeImportance(p=2) to "
                                f"{best[1]} MACs\n")
    runs.write_metrics(out, {"macs": best[1], "stage": "prune", "from": str(base), "pruner": "torch-pruning"})


def quantize_rows(name: str, run: Path, work: Path, qat_epochs: int, qat_lr: float) -> list[dict[str, Any]]:
    """Post-training int8 of ``run`` for each runtime, and ``finetune --qat`` where it loses > 0.5 point."""
    rows = []
    for rt in RUNTIMES:
        m = stage(work / f"{name}_{rt}", "quantize", "--from", str(run), "--backend", rt, "--latency-runs", "0")
        rows.append({"variant": name, "runtime": rt, "method": "PTQ", "top1_fp32": m["top1_float"],
                     "top1_int8": m["top1"], "samples": m["test_samples"], "macs": m["macs"]})
        if name == "dense" or m["top1_int8_drop"] <= 0.5 or qat_epochs <= 0:
            continue
        for scheme in dict.fromkeys((rt, "onnxruntime")):  # the runtime's own scheme simulated, and ONNX Runtime's
            out = work / (f"{name}_qat_{rt}" if scheme == rt else f"{name}_qat_{rt}_{scheme}-scheme")
            q = stage(out, "finetune", "--from", str(run), "--qat", "--qat-backend", rt, "--qat-scheme", scheme,
                      "--epochs", str(qat_epochs), "--lr", str(qat_lr))
            rows.append({"variant": name, "runtime": rt, "method": f"QAT {qat_epochs} ep, {scheme} scheme",
                         "top1_fp32": m["top1_float"], "top1_int8": q["top1"], "samples": q["test_samples"],
                         "macs": m["macs"]})
    return rows


def accuracy(work: Path, trained: Path | None, finetune_epochs: int, qat_epochs: int) -> list[dict[str, Any]]:
    """ResNet-20 on Fashion-MNIST: dense, prunekit-pruned (50% MACs, fine-tuned) and torch-pruning's pruned model at
    the same MACs (same fine-tune): float32 vs int8 test top-1 per runtime (post-training, and QAT where it loses)."""
    base = trained or CACHE / "r20-fmnist"
    stage(base, "train", *BASE_TRAIN)
    p = stage(work / "pruned", "prune", "--from", str(base), "--criterion", "l2", "--target-macs", "0.5",
              "--round-to", "16")
    tune = ("--epochs", str(finetune_epochs), "--lr", "0.01")
    stage(work / "ft", "finetune", "--from", str(work / "pruned"), *tune)
    tp_prune(base, p["macs"], work / "tp")
    stage(work / "tp-ft", "finetune", "--from", str(work / "tp"), *tune)
    rows = []
    for name, run in (("dense", base), ("prunekit", work / "ft"), ("torch-pruning", work / "tp-ft")):
        rows += quantize_rows(name, run, work, qat_epochs, 0.002)
    return rows


def print_accuracy(rows: list[dict[str, Any]]) -> None:
    print("\n| ResNet-20 FMNIST | runtime | MACs (M) | int8 by | test top-1 fp32 | test top-1 int8 | int8 - fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['runtime']} | {r['macs'] / 1e6:.1f} | {r['method']} | {r['top1_fp32']:.2f} | "
              f"{r['top1_int8']:.2f} | {r['top1_int8'] - r['top1_fp32']:+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,mobilenetv3")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--runs", type=int, default=20, help="timed calls per variant (split over 5 rounds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--accuracy-run", type=Path, help="a trained ResNet-20 run directory to start from (default: "
                   "train one on Fashion-MNIST, cached)")
    p.add_argument("--work", type=Path, default=CACHE / "work", help="accuracy runs (reused when finished)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=2, help="finetune --qat epochs where post-training int8 loses "
                   "more than 0.5 point (0: none)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {a.threads}")
    lat = [r for m in a.models.split(",") if m for r in time_model(m, [int(b) for b in a.batches.split(",")],
                                                                    a.runs, a.threads)]
    print_latency(lat)
    acc = []
    if not a.no_accuracy:
        acc = accuracy(a.work, a.accuracy_run, a.finetune_epochs, a.qat_epochs)
        print_accuracy(acc)
    print(f"\n{time.time() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"latency": lat, "accuracy": acc}, indent=1))


if __name__ == "__main__":
    main()
