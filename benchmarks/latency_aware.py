"""Latency-aware pruning vs fixed channel rounding (prunekit and torch-pruning), side by side, paired timing.

For each model (random init; latency does not depend on the weights): the dense network and copies pruned with L2
scores, per-layer ratio, to keep ~50% of the MACs:

- ``tp round_to R``: torch-pruning's MetaPruner, kept channels rounded to ``R = recommended_round_to(backend)`` (16
  on an AVX-512 CPU, 8 with AVX2), the ratio bisected to 50% MACs (what a torch-pruning user does);
- ``prunekit round_to R``: prunekit's engine, ``target_macs=0.5``, same rounding;
- ``prunekit LUT``: prunekit, ``target_macs=0.5, latency_backend=<backend>``: each group's width chosen at the top of
  the latency step of the backend's measured per-layer latency table (built once per model and backend, cached
  under ``~/.cache/prunekit/latency``; ``prunekit.pruning.structured.latency``);
- ``prunekit target_latency T`` (``--target-latency T``): prunekit asked for a latency fraction instead of MACs;
- ``prunekit LUT+context K`` (``--context K``): the LUT widths, then the K costliest groups re-timed inside the whole
  model one grid step below / above (``latency_context_groups``, ``prunekit.pruning.structured.latency_context``).

Backend ``onnxruntime-int8`` (``--backends onnxruntime-int8``): every variant, dense included, is quantized to int8
the way ``prunekit quantize`` does (QDQ, per-channel weights, uint8 activations; calibrated on the example input
and noisy copies of it: latency does not depend on the ranges) and timed on ONNX Runtime, so the latency cut is
pruned int8 against dense int8; ``R = recommended_round_to("onnxruntime", "int8")`` (16) and the LUT variant uses
the int8 table (each layer quantized alone, its int8 kernels timed: ``prunekit.measure.latency_int8``).
``openvino-int8``: the same on OpenVINO, every variant quantized by NNCF (``prunekit.measure.latency_ov``).

All variants of a model are timed *alternately* in one ``compare_latency`` call per backend (A B C D, D C B A, ...),
batch 1, ``--threads`` threads; the whole comparison is repeated ``--repeats`` times and the table gives the median
over repeats with the range. ``eager`` times every variant (dense included) as an inference copy: BatchNorm folded
into the convs and channels_last (``prunekit.measure.latency_table.inference_copy``); ``eager-plain`` (optional)
times the models as they are. ``efficiency = latency cut / MACs cut``. For the LUT variant the script also prints
what the table says: the timed layers' sum dense -> pruned and the rest of the model (dense measured minus its
layers: activations, adds, pooling, per-op overhead), which pruning does not shrink.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency_aware.py                     # all models
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency_aware.py --models resnet56 --repeats 3
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/latency_aware.py --models tv:resnet50 \
        --backends onnxruntime-int8,onnxruntime --repeats 3                                         # int8 and float
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit import count_macs, create_model
from prunekit.errors import PruningError
from prunekit.measure.hardware import recommended_round_to
from prunekit.measure.latency import compare_latency
from prunekit.measure.latency_table import channels_last_inputs, inference_copy

TARGET_KEEP = 0.5
MODELS = {  # name -> (create_model name, kwargs, input shape)
    "tv:resnet50": ("tv:resnet50", {"num_classes": 1000}, (3, 224, 224)),
    "resnet56": ("resnet56", {"num_classes": 10}, (3, 32, 32)),
    "demo:resnet20": ("resnet20", {"num_classes": 10, "in_channels": 1}, (1, 16, 16)),  # `prunekit demo`'s model
}
RUNS = {"tv:resnet50": 30, "resnet56": 60, "demo:resnet20": 100}


def tp_prune(dense: nn.Module, x: torch.Tensor, round_to: int) -> tuple[nn.Module, float]:
    """torch-pruning MetaPruner, L2, per-layer ratio bisected to TARGET_KEEP of the MACs (+-1.5%)."""
    m0 = count_macs(dense, x)
    lo, hi, ratio, best = 0.05, 0.8, 1 - TARGET_KEEP ** 0.5, None
    for _ in range(8):
        m = copy.deepcopy(dense)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        tp.pruner.MetaPruner(m, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                             global_pruning=False, round_to=round_to, ignored_layers=heads).step()
        keep = count_macs(m, x) / m0
        if best is None or abs(keep - TARGET_KEEP) < abs(best[1] - TARGET_KEEP):
            best = (m, keep)
        if abs(keep - TARGET_KEEP) <= 0.015:
            break
        lo, hi = (ratio, hi) if keep > TARGET_KEEP else (lo, ratio)
        ratio = (lo + hi) / 2
    return best[0].eval(), best[1]


def pk_prune(dense: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[nn.Module, float, dict[str, Any]]:
    from prunekit.pruning.structured import PruneSettings, prune_with_settings

    m = copy.deepcopy(dense)
    s = PruneSettings.build({"criterion": "l2", "scope": "local", "latency_verify_runs": 0, **kw}, "benchmark")
    rep = prune_with_settings(m, x, s)
    return m.eval(), rep.macs_kept, rep.latency


def timed_models(models: dict[str, nn.Module], x: torch.Tensor, backend: str) -> tuple[dict[str, nn.Module], Any, str]:
    if backend == "eager":
        return {k: inference_copy(m)[0] for k, m in models.items()}, channels_last_inputs(x), "eager"
    return models, x, "eager" if backend == "eager-plain" else backend


def block_size(backend: str) -> int:
    """The channel multiple of the rounded variants: the SIMD block (fp32), 16 for int8 kernels."""
    if backend.endswith("-int8"):
        return recommended_round_to("onnxruntime", "int8")
    return recommended_round_to("eager" if backend.startswith("eager") else backend)


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, backend: str, threads: int, repeats: int,
                  runs: int) -> tuple[dict[str, list[float]], list[float]]:
    """Every variant timed alternately with ``dense`` in each of ``repeats`` paired runs: (name -> latency cut per
    repeat, dense ms per repeat). ``onnxruntime-int8`` / ``openvino-int8``: every variant quantized once (ORT's
    quantizer / NNCF), then timed on that runtime."""
    per: dict[str, list[float]] = {k: [] for k in variants}
    dense_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="latency-aware-") as tmp:
        if backend.endswith("-int8"):
            from prunekit.measure.latency_int8 import int8_calls, paired
            from prunekit.measure.latency_ov import ov_int8_calls

            fns = ov_int8_calls(variants, x, threads) if backend == "openvino-int8" else \
                int8_calls(variants, x, threads, tmp)
        else:
            models, xt, tb = timed_models(variants, x, backend)
        for rep in range(repeats):
            if backend.endswith("-int8"):
                st = paired(fns, 1, runs, 10, threads, backend)
            else:
                st = compare_latency(models, xt, tb, runs=runs, warmup=5, threads=threads, rounds=10)
            dense_ms.append(st["dense"].median_ms)
            for k, s in st.items():
                per[k].append(1 - s.median_ms / st["dense"].median_ms)
            print(f"#   repeat {rep + 1}: " + ", ".join(f"{k} {s.median_ms:.2f} ms" for k, s in st.items())
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    return per, dense_ms


def run_model(name: str, backends: list[str], threads: int, repeats: int, target_latency: float | None,
              wide: bool = False, context: int = 0) -> list[dict[str, Any]]:
    ref, kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    dense = create_model(ref, **kwargs).eval()
    x = torch.randn(1, *shape)
    rows = []
    rounded: dict[int, tuple] = {}  # round_to -> the two rounded variants (the same for every backend)
    for backend in backends:
        lut = "eager" if backend.startswith("eager") else backend
        r = block_size(backend)
        t0 = time.perf_counter()
        variants: dict[str, nn.Module] = {"dense": dense}
        keeps: dict[str, float] = {"dense": 1.0}
        infos: dict[str, dict[str, Any]] = {}
        if r not in rounded:
            rounded[r] = (tp_prune(dense, x, r), pk_prune(dense, x, target_macs=TARGET_KEEP, round_to=r)[:2])
        variants[f"tp round_to {r}"], keeps[f"tp round_to {r}"] = rounded[r][0]
        variants[f"prunekit round_to {r}"], keeps[f"prunekit round_to {r}"] = rounded[r][1]
        if wide:  # four SIMD blocks: a whole filter set of ONNX Runtime's NCHWc convolutions
            w = 4 * r
            if w not in rounded:
                try:
                    rounded[w] = (tp_prune(dense, x, w), pk_prune(dense, x, target_macs=TARGET_KEEP, round_to=w)[:2],
                                  pk_prune(dense, x, target_macs=TARGET_KEEP, round_to=r, round_to_wide=w)[:2])
                except PruningError as e:  # a narrow model: nothing keeps 4 blocks
                    print(f"# {name}: round_to {w}: {e}", flush=True)
                    rounded[w] = None
            if rounded[w] is not None:
                variants[f"tp round_to {w}"], keeps[f"tp round_to {w}"] = rounded[w][0]
                variants[f"prunekit round_to {w}"], keeps[f"prunekit round_to {w}"] = rounded[w][1]
                variants[f"prunekit round_to {r}/{w}"], keeps[f"prunekit round_to {r}/{w}"] = rounded[w][2]
        label = f"prunekit LUT {lut}"
        variants[label], keeps[label], infos[label] = pk_prune(dense, x, target_macs=TARGET_KEEP, latency_backend=lut)
        if context:
            label = f"prunekit LUT+context {context}"
            variants[label], keeps[label], infos[label] = pk_prune(
                dense, x, target_macs=TARGET_KEEP, latency_backend=lut, latency_context_groups=context)
            for t in infos[label]["context"]:
                print(f"#   in context: {t['group']}: table {t['table']} -> {t['chosen']} " + (
                      f"({t['skipped']})" if "skipped" in t else f"(width: [ms, MACs kept, efficiency] "
                      f"{t['timed']}, dense {t['dense_ms']} ms)"), flush=True)
        if target_latency is not None:
            label = f"prunekit target_lat {target_latency}"
            try:
                variants[label], keeps[label], infos[label] = pk_prune(dense, x, target_latency=target_latency,
                                                                       latency_backend=lut)
            except PruningError as e:
                print(f"# {name} {backend}: {label}: {e}", flush=True)
        print(f"# {name} {backend}: variants built in {time.perf_counter() - t0:.0f} s "
              f"(MACs kept: {', '.join(f'{k} {v:.3f}' for k, v in keeps.items() if k != 'dense')})", flush=True)
        for label, info in infos.items():
            sp = info["table_spread"]
            print(f"#   {label}: table {info['table_entries_timed']} timed / {info['table_entries_cached']} cached "
                  f"({info['table_seconds']} s; spread across repeats of an entry: median {sp['median']:.1%}, max "
                  f"{sp['max']:.1%}); LUT layers {info['layers_ms']:.2f} -> {info['layers_pruned_ms']:.2f} "
                  f"ms, rest (untimed ops) {info['rest_ms']:.2f} ms; predicted "
                  f"latency kept {info['predicted_kept']:.3f}", flush=True)
        runs = RUNS.get(name, 40)
        per, dense_ms = time_variants(variants, x, backend, threads, repeats, runs)
        for k in variants:
            if k == "dense":
                continue
            cuts, macs_cut = per[k], 1 - keeps[k]
            rows.append({"model": name, "backend": backend, "variant": k, "macs_cut": macs_cut,
                         "lat_cut": statistics.median(cuts), "lat_cut_min": min(cuts), "lat_cut_max": max(cuts),
                         "efficiency": statistics.median(cuts) / macs_cut, "eff_min": min(cuts) / macs_cut,
                         "eff_max": max(cuts) / macs_cut, "dense_ms": statistics.median(dense_ms),
                         "dense_ms_min": min(dense_ms), "dense_ms_max": max(dense_ms),
                         "repeats": repeats, "runs": runs, **({"lut": infos[k]} if k in infos else {})})
            print_row(rows[-1])
    return rows


HEADER = (f"{'model':14} {'backend':16} {'variant':30} {'MACs cut':>8} {'lat. cut':>8} {'(range)':>15} "
          f"{'effic.':>6} {'(range)':>11} {'dense ms (range)':>22}")


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['model']:14} {r['backend']:16} {r['variant']:30} {r['macs_cut']:>8.1%} {r['lat_cut']:>8.1%} "
          f"{r['lat_cut_min']:>7.1%}-{r['lat_cut_max']:<7.1%} {r['efficiency']:>6.2f} "
          f"{r['eff_min']:>5.2f}-{r['eff_max']:<5.2f} {r['dense_ms']:>9.2f} "
          f"({r['dense_ms_min']:.2f}-{r['dense_ms_max']:.2f})", flush=True)


def block_of(module: str) -> str:
    """``layer1.0.conv1`` -> ``layer1.0``, ``layer1.0.downsample.0`` -> ``layer1.0``, ``conv1`` -> ``conv1``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the conv / linear modules in the order the forward pass calls them."""
    seen: list[str] = []
    hooks = [m.register_forward_hook(lambda *_a, n=n: seen.append(n)) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def explain_onnx(name: str, dense: nn.Module, pruned: nn.Module, x: torch.Tensor, threads: int, runs: int = 30
                 ) -> None:
    """Where the pruned model's ONNX Runtime latency falls short of its MACs cut, per block, from ORT's per-node
    profile of each whole model (minimum kernel time per node over ``runs`` runs). ORT's optimised graph names its
    nodes after values, not modules: its conv / gemm nodes (each one conv with its fused BN, ReLU and add) are
    matched to the conv / linear modules in execution order, which keeps every node in its block. ``shortfall`` =
    dense ms x MACs cut - (dense ms - pruned ms): what the block would save more if its latency fell with its MACs."""
    from prunekit.measure.latency_table import TIMED_ONNX_OPS, onnx_node_times
    from prunekit.measure.layers import module_macs

    blocks: dict[str, dict[str, float]] = {}
    totals = {}

    def block(b: str) -> dict[str, float]:
        return blocks.setdefault(b, {"dense": 0.0, "pruned": 0.0, "macs_dense": 0, "macs_pruned": 0})

    for k, m in (("dense", dense), ("pruned", pruned)):
        nodes = onnx_node_times(m, x, threads, runs)
        convs = [(n, ms) for n, (ms, op) in nodes.items() if op in TIMED_ONNX_OPS]
        order = call_order(m, x)
        if len(convs) != len(order):
            print(f"# {name}: {len(convs)} conv/gemm nodes for {len(order)} conv/linear modules; per-block figures "
                  "need one node per module")
            return
        for (_, ms), module in zip(convs, order, strict=True):
            block(block_of(module))[k] += ms
        other = sum(ms for ms, op in nodes.values() if op not in TIMED_ONNX_OPS)
        block("(other nodes)")[k] += other
        for mod, v in module_macs(m, x).items():
            if mod in order:
                block(block_of(mod))[f"macs_{k}"] += v
        totals[k] = sum(ms for ms, _ in nodes.values())
    md = sum(b["macs_dense"] for b in blocks.values())
    mp = sum(b["macs_pruned"] for b in blocks.values())
    print(f"\n# {name}, ONNX Runtime per-node profile (sum of per-node minima over {runs} runs; the whole-model time "
          f"adds dispatch between nodes): dense {totals['dense']:.2f} ms -> pruned {totals['pruned']:.2f} ms, latency "
          f"cut {1 - totals['pruned'] / totals['dense']:.1%} for a MACs cut of {1 - mp / md:.1%} "
          f"(efficiency {(1 - totals['pruned'] / totals['dense']) / (1 - mp / md):.2f})")
    print(f"#   {'block':22} {'dense ms':>8} {'pruned ms':>9} {'lat. cut':>8} {'MACs cut':>8} {'shortfall ms':>12}")
    rows = []
    for b, t in blocks.items():
        mc = 1 - t["macs_pruned"] / t["macs_dense"] if t["macs_dense"] else 0.0
        rows.append((t["dense"] * mc - (t["dense"] - t["pruned"]), b, t, mc))
    for short, b, t, mc in sorted(rows, key=lambda r: r[0], reverse=True):
        print(f"#   {b:22} {t['dense']:8.2f} {t['pruned']:9.2f} {1 - t['pruned'] / max(t['dense'], 1e-9):8.1%} "
              f"{mc:8.1%} {short:12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--backends", default="onnxruntime,eager", help="onnxruntime, eager (BN folded, channels_last), "
                    "eager-plain (the model as is), onnxruntime-int8 / openvino-int8 (every variant quantized, timed "
                    "on ORT / OpenVINO)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the whole paired comparison (at least 2: "
                    "every figure comes with its range over the repeats)")
    ap.add_argument("--target-latency", type=float, default=None, help="also prune with target_latency")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--context", type=int, default=0, help="also the LUT widths checked in context for the K "
                    "costliest groups (latency_context_groups=K)")
    ap.add_argument("--wide", action="store_true", help="also round to 4 SIMD blocks (R = 4 x block: torch-pruning "
                    "and prunekit), and prunekit round_to block with round_to_wide 4 x block")
    ap.add_argument("--explain", action="store_true", help="only the per-block ONNX Runtime profile of dense vs "
                    "prunekit round_to R (where the latency falls short of the MACs cut), no timing table")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error(f"--repeats {args.repeats}: need at least 2 (the table gives the range over repeats)")
    logging.basicConfig(level=logging.WARNING)
    print(f"# torch {torch.__version__}, {args.threads} threads, batch 1, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r}, "
          f"recommended_round_to: onnxruntime {recommended_round_to('onnxruntime')}, "
          f"eager {recommended_round_to('eager')}", flush=True)
    if args.explain:
        for name in args.models.split(","):
            ref, kwargs, shape = MODELS[name]
            torch.manual_seed(0)
            dense = create_model(ref, **kwargs).eval()
            x = torch.randn(1, *shape)
            pruned = pk_prune(dense, x, target_macs=TARGET_KEEP, round_to=recommended_round_to("onnxruntime"))[0]
            explain_onnx(name, dense, pruned, x, args.threads)
        return
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.backends.split(","), args.threads, args.repeats, args.target_latency, args.wide,
                          args.context)
    print(f"\n# load average at the end: {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[2]:.1f} (15 min); "
          "latency cut and efficiency: median over repeats (range)")
    print(HEADER)
    for r in rows:
        print_row(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
