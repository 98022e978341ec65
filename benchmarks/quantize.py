"""Prune, then quantize: four variants side by side on the CPU runtimes that ship them.

Latency (random weights): torchvision ResNet-50 and MobileNetV3-Large, dense and pruned with
``prunekit.prune(model, x, "l2", target_macs=0.5, round_to=16)``; each exported once to float ONNX and quantized
(static int8, per-channel weights, random calibration batches) for ONNX Runtime (QDQ) and OpenVINO (NNCF). All
variants of a model and batch size (eager float32 dense / pruned, and dense fp32, pruned fp32, dense int8, pruned
int8 on each runtime) are timed *alternately* in one run (``prunekit.quantize.latency.paired_times``): rounds of
A B C ... then ... C B A, so a drifting machine slows all alike. Medians and the spread of per-round medians.

Accuracy: a ResNet-20 trained on digits (``prunekit train``), pruned to 50% MACs and fine-tuned, then ``prunekit
quantize`` for each runtime: test top-1 of float32 and int8 on the same runtime.

Usage::

    .venv/bin/python benchmarks/quantize.py                                   # everything (~10 min on 2 cores)
    .venv/bin/python benchmarks/quantize.py --models resnet50 --batches 1 --runs 20 --no-accuracy
    .venv/bin/python benchmarks/quantize.py --accuracy-run runs/r20 --json out.json   # reuse a trained ResNet-20
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit import count_macs, create_model
from prunekit.quantize.graph import export_float
from prunekit.quantize.latency import eager_call, file_call, paired_times, round_spread

MODELS = {"resnet50": "tv:resnet50", "mobilenetv3": "tv:mobilenet_v3_large"}
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


def accuracy(work: Path, trained: Path | None, finetune_epochs: int) -> list[dict[str, Any]]:
    """ResNet-20 on digits: dense and pruned (50% MACs, fine-tuned), float32 vs int8 test top-1 per runtime."""
    base = trained or work / "base"
    if trained is None:
        cli("train", "--model", "resnet20", "--dataset", "digits", "--out", str(base))
    cli("prune", "--from", str(base), "--criterion", "l2", "--target-macs", "0.5", "--round-to", "16",
        "--out", str(work / "pruned"))
    cli("finetune", "--from", str(work / "pruned"), "--epochs", str(finetune_epochs), "--out", str(work / "ft"))
    rows = []
    for variant, run in (("dense", base), ("pruned", work / "ft")):
        for rt in RUNTIMES:
            out = work / f"{variant}_{rt}"
            cli("quantize", "--from", str(run), "--backend", rt, "--out", str(out), "--latency-runs", "0")
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"variant": variant, "runtime": rt, "top1_fp32": m["top1_float"], "top1_int8": m["top1"],
                         "drop": m["top1_int8_drop"], "samples": m["test_samples"], "macs": m["macs"]})
    return rows


def print_accuracy(rows: list[dict[str, Any]]) -> None:
    print("\n| ResNet-20 digits | runtime | MACs (M) | test top-1 fp32 | test top-1 int8 | int8 - fp32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['runtime']} | {r['macs'] / 1e6:.1f} | {r['top1_fp32']:.2f} | "
              f"{r['top1_int8']:.2f} | {-r['drop']:+.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,mobilenetv3")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--runs", type=int, default=20, help="timed calls per variant (split over 5 rounds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--accuracy-run", type=Path, help="a trained ResNet-20 digits run directory to start from")
    p.add_argument("--finetune-epochs", type=int, default=3)
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
        with tempfile.TemporaryDirectory(prefix="bench-quantize-acc-") as work:
            acc = accuracy(Path(work), a.accuracy_run, a.finetune_epochs)
        print_accuracy(acc)
    print(f"\n{time.time() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"latency": lat, "accuracy": acc}, indent=1))


if __name__ == "__main__":
    main()
