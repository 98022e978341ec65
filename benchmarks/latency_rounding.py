"""Does the MACs cut turn into latency? Pruned to ~50% MACs with and without hardware-aware channel rounding,
timed against the dense model on torch eager and ONNX Runtime (CPU), batch 1 and 32, in one run.

For each model: the dense network, and copies pruned (L2, per-layer ratio; prunekit's structured engine, or
torch-pruning's MetaPruner) to keep 50% of the MACs (+- 1.5%, or as close as rounding allows) with kept channels
not rounded, rounded to ``recommended_round_to("onnxruntime")`` (8 on an AVX2 CPU, 16 with AVX-512) and rounded to
16. All variants of a model are timed *alternately* in one ``compare_latency`` call per backend and batch size
(rounds of A B C D, then D C B A, ...), so machine noise hits them alike; the whole comparison is repeated
``--repeats`` times (at least 2) and every figure is the median over repeats with its range (lowest-highest).
``efficiency = latency reduction / MACs reduction``.

Usage::

    .venv/bin/python benchmarks/latency_rounding.py                    # both models, ~10 min on 2 idle cores
    .venv/bin/python benchmarks/latency_rounding.py --models resnet56 --batches 1 --json out.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency_rounding.py     # on a busy, shared machine

On a busy machine, OpenMP threads that spin-wait for a descheduled peer make 2-thread torch runs up to 10x slower
(measured here: ResNet-50 batch 1, 2 threads, load 9 on 2 cores: 7.9 s per call spinning, 0.65 s passive), and the
slowdown is per layer, not per MAC, so it hides the pruning gain; ``OMP_WAIT_POLICY=PASSIVE`` (which also turns off
ONNX Runtime's spinning, see ``prunekit.export.onnx.ort_session``) avoids it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit import count_macs, create_model
from prunekit.measure.hardware import recommended_round_to
from prunekit.measure.latency import compare_latency

TARGET_KEEP = 0.5  # fraction of MACs kept
TOL = 0.015
MODELS = {  # name -> (create_model name, kwargs, input shape)
    "resnet56": ("resnet56", {"num_classes": 10}, (3, 32, 32)),
    "tv:resnet50": ("tv:resnet50", {"num_classes": 1000}, (3, 224, 224)),
}
# timed runs per model and (warm-up, rounds) by batch size: batch 32 of ResNet-50 takes seconds per call
RUNS = {1: (40, 5, 10), 32: (6, 1, 6)}


def prune_once(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None, pruner: str) -> None:
    """Per-layer L2 pruning of ``ratio`` of the channels, kept channels rounded to ``round_to``, classifier kept."""
    if pruner == "prunekit":
        from prunekit.pruning.structured import prune

        prune(model, x, criterion="l2", ratio=ratio, scope="local", round_to=round_to)
        return
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, global_pruning=False,
                         round_to=round_to, ignored_layers=heads).step()


def prune_to_macs(dense: nn.Module, x: torch.Tensor, round_to: int | None, pruner: str
                  ) -> tuple[nn.Module, float, float]:
    """A copy of ``dense`` pruned to keep TARGET_KEEP +- TOL of its MACs (bisection on the ratio): (model, ratio,
    kept fraction of the MACs); the closest probe when rounding makes the target unreachable."""
    m0 = count_macs(dense, x)
    lo, hi, ratio = 0.05, 0.7, 1 - TARGET_KEEP ** 0.5  # uniform channel keep k cuts MACs to about k^2
    best = None
    for _ in range(6):
        m = copy.deepcopy(dense)
        prune_once(m, x, ratio, round_to, pruner)
        keep = count_macs(m, x) / m0
        if best is None or abs(keep - TARGET_KEEP) < abs(best[2] - TARGET_KEEP):
            best = (m, ratio, keep)
        if abs(keep - TARGET_KEEP) <= TOL:
            break
        lo, hi = (ratio, hi) if keep > TARGET_KEEP else (lo, ratio)
        ratio = (lo + hi) / 2
    return best


def pick_pruner(requested: str) -> str:
    """``prunekit`` (the structured engine) when it imports and prunes a toy model, else torch-pruning directly."""
    if requested != "auto":
        return requested
    try:
        prune_once(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 2)),
                   torch.randn(1, 3, 8, 8), 0.5, None, "prunekit")
        return "prunekit"
    except Exception as e:  # the engine is work in progress in this tree: say so and measure with torch-pruning
        print(f"# prunekit's engine failed on a toy model ({type(e).__name__}: {e}); pruning with torch-pruning")
        return "tp"


def row(name: str, batch: int, backend: str, label: str, keep: float, reps: list[dict[str, Any]], runs: int
        ) -> dict[str, Any]:
    """One variant's figures over the repeats: medians and (lowest, highest) of the latency cut and efficiency."""
    cuts = [1 - st[label].median_ms / st["dense"].median_ms for st in reps]
    dense = [st["dense"].median_ms for st in reps]
    pruned = [st[label].median_ms for st in reps]
    macs_red = 1 - keep
    return {"model": name, "batch": batch, "backend": backend, "variant": label, "macs_reduction": macs_red,
            "latency_reduction": statistics.median(cuts), "latency_reduction_range": [min(cuts), max(cuts)],
            "latency_efficiency": statistics.median(cuts) / macs_red,
            "latency_efficiency_range": [min(cuts) / macs_red, max(cuts) / macs_red],
            "dense_ms": statistics.median(dense), "dense_ms_range": [min(dense), max(dense)],
            "pruned_ms": statistics.median(pruned), "pruned_ms_range": [min(pruned), max(pruned)],
            "repeats": len(reps), "runs": runs}


def run_model(name: str, batches: list[int], backends: list[str], threads: int, pruner: str, repeats: int = 2
              ) -> list[dict[str, Any]]:
    ref, kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    dense = create_model(ref, **kwargs).eval()
    x1 = torch.randn(1, *shape)
    auto = recommended_round_to("onnxruntime")
    variants: dict[str, nn.Module] = {"dense": dense}
    keeps: dict[str, float] = {"dense": 1.0}
    for label, r in (("no rounding", None), (f"round_to {auto} (auto)", auto), ("round_to 16", 16)):
        if r == 16 and auto == 16:
            continue
        t0 = time.perf_counter()
        m, ratio, keep = prune_to_macs(dense, x1, r, pruner)
        variants[label], keeps[label] = m.eval(), keep
        odd = sum(c.out_channels % 8 != 0 for c in m.modules() if isinstance(c, nn.Conv2d))
        print(f"# {name}: {label}: ratio {ratio:.3f} keeps {keep:.3f} of the MACs, {odd} convs with channels not a "
              f"multiple of 8 ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for batch in batches:
        runs, warmup, rounds = RUNS.get(batch, (10, 2, 5))
        x = torch.randn(batch, *shape)
        for backend in backends:
            t0 = time.perf_counter()
            reps = [compare_latency(variants, x, backend, runs=runs, warmup=warmup, threads=threads, rounds=rounds,
                                    rewarm=batch < 8) for _ in range(repeats)]
            for label in variants:
                if label != "dense":
                    rows.append(row(name, batch, backend, label, keeps[label], reps, runs))
                    print_row(rows[-1])
            print(f"# ({name}, batch {batch}, {backend}: {time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


HEADER = (f"{'model':12} {'batch':>5} {'backend':12} {'variant':22} {'MACs cut':>8} {'lat. cut (range)':>22} "
          f"{'effic. (range)':>18} {'dense ms (range)':>24} {'pruned ms (range)':>24}")


def _rng(v: float, r: list[float], f: str) -> str:
    return f"{v:{f}} ({r[0]:{f}}-{r[1]:{f}})"


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['model']:12} {r['batch']:>5} {r['backend']:12} {r['variant']:22} {r['macs_reduction']:>8.1%} "
          f"{_rng(r['latency_reduction'], r['latency_reduction_range'], '.1%'):>22} "
          f"{_rng(r['latency_efficiency'], r['latency_efficiency_range'], '.2f'):>18} "
          f"{_rng(r['dense_ms'], r['dense_ms_range'], '.2f'):>24} "
          f"{_rng(r['pruned_ms'], r['pruned_ms_range'], '.2f'):>24}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--backends", default="eager,onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="repeats of each paired comparison (at least 2: every "
                    "figure comes with its range over the repeats)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--pruner", default="auto", choices=["auto", "prunekit", "tp"],
                    help="prunekit's structured engine, torch-pruning's MetaPruner, or auto (prunekit if it works)")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error(f"--repeats {args.repeats}: need at least 2 (the table gives the range over repeats)")
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# torch {torch.__version__}, {args.threads} threads, recommended_round_to(onnxruntime) = "
          f"{recommended_round_to('onnxruntime')}, eager = {recommended_round_to('eager')}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}")
    print(HEADER, flush=True)
    pruner = pick_pruner(args.pruner)
    print(f"# pruner: {pruner} (L2, per-layer ratio)", flush=True)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, batches, args.backends.split(","), args.threads, pruner, args.repeats)
    print(f"\n# load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[2]:.1f} (15 min)")
    print(HEADER)
    for r in rows:
        print_row(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
