"""Baseline vs pruned: params, MACs, FLOPs and latency per backend, the MACs-vs-latency verdict, and per-layer times.

``latency_reduction = 1 - pruned_median / baseline_median`` (both timed alternately in one run),
``macs_reduction = 1 - pruned_macs / baseline_macs``, ``latency_efficiency = latency_reduction / macs_reduction``:
1.0 means the MACs cut turned fully into speed; 0.5 means half of it did.

Example:
    >>> p = profile_models(dense, pruned, torch.randn(1, 3, 224, 224), backends=("eager", "onnxruntime"))
    >>> p["latency_efficiency"]["onnxruntime"], p["backends"]["onnxruntime"]["verdict"]
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from prunekit.config import Config
from prunekit.measure.latency import BACKENDS, BackendUnavailable, check_backends, compare_latency, percentile
from prunekit.measure.layers import compare_layers, layer_times_many
from prunekit.measure.macs import count_flops, count_macs, count_params

log = logging.getLogger(__name__)
PROFILE_FILE = "profile.json"


class LatencyArgs(Config):
    """Timing options shared by ``prunekit profile`` and ``prunekit eval --latency``."""

    backend: list[str] = Field(["eager", "onnxruntime"], description="latency backends, comma-separated: eager, "
                                                                     "onnxruntime, compile, cuda")
    threads: int | None = Field(None, gt=0, description="intra-op threads for torch and ONNX Runtime (default: "
                                                        "torch's current setting, usually the core count)")
    runs: int = Field(50, gt=0, description="timed runs per model and backend")
    warmup: int = Field(10, ge=0, description="untimed warm-up runs per model and backend")

    @field_validator("backend")
    @classmethod
    def _known_backends(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one backend; valid: {', '.join(BACKENDS.names())}")
        for name in v:
            BACKENDS.get(name)
        return list(dict.fromkeys(v))


# ----------------------------------------------------------------------------------------------- verdict
def verdict(macs_reduction: float, latency_reduction: float, backend: str, batch_size: int = 1,
            spread: tuple[float, float] | None = None) -> str:
    """One plain-words sentence on how far the MACs cut turned into lower latency on ``backend``."""
    from prunekit.measure.hardware import recommended_round_to

    lat, macs = latency_reduction, macs_reduction
    if macs <= 0.01:
        text = (f"{backend}: the pruned model has about as many MACs as the baseline ({macs:+.1%} cut), so no "
                f"speed-up is expected; latency changed by {-lat:+.1%}.")
    else:
        eff = lat / macs
        head = f"{backend}: {macs:.0%} fewer MACs gave {lat:.0%} lower latency (efficiency {eff:.2f}): "
        if eff >= 0.9:
            text = head + "latency follows MACs; the MACs cut is real speed here."
        elif eff >= 0.6:
            text = head + ("latency follows MACs only in part; the rest of the time goes to work that does not "
                           "shrink with channels (memory traffic, element-wise ops, per-layer overhead) or to "
                           f"channel counts its kernels handle poorly (try --round-to "
                           f"{recommended_round_to(backend)}; for a wide CNN on a CPU, --round-to "
                           f"{4 * recommended_round_to(backend)}, four SIMD blocks).")
        elif eff > 0:
            text = head + (f"MACs overstate the gain; at batch {batch_size} this backend is bound by overhead and "
                           "memory traffic more than by arithmetic (try a larger batch, --round-to "
                           f"{recommended_round_to(backend)}, or pruning whole blocks).")
        else:
            text = (f"{backend}: no speed-up: latency changed by {-lat:+.1%} despite {macs:.0%} fewer MACs; "
                    "the cut layers do not carry the time on this backend.")
    if spread is not None and spread[1] - spread[0] > 0.2:
        text += (f" Rounds disagree (latency reduction {spread[0]:.0%} to {spread[1]:.0%} from round to round): "
                 "the machine was noisy; rerun with more --runs.")
    return text


# ----------------------------------------------------------------------------------------------- model level
def machine_state() -> dict[str, Any]:
    """CPU, core count, load average and OpenMP wait policy, with a loud warning when the machine is busy."""
    import os

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    state = {"cpu": platform.processor() or platform.machine(), "cores": cores, "load_average_1min": load,
             "omp_wait_policy": policy or None, "torch": torch.__version__}
    if load is not None and load > 0.75 * cores:
        log.warning("the machine is busy (load average %.1f on %d cores): absolute latencies are unreliable and "
                    "multi-threaded runs suffer most%s; the baseline/pruned ratios hold better since they are "
                    "timed alternately", load, cores,
                    "" if policy.upper() == "PASSIVE" else " (OpenMP threads spin-wait for descheduled peers: start "
                    "the process with OMP_WAIT_POLICY=PASSIVE, or rerun when the machine is idle)")
    return state



def _reduction(before: float, after: float) -> float | None:
    return 1 - after / before if before else None


def model_figures(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Params and per-sample MACs and FLOPs."""
    return {"params": count_params(model), "macs": count_macs(model, example_inputs),
            "flops": count_flops(model, example_inputs)}


def profile_models(baseline: nn.Module, pruned: nn.Module, example_inputs: Any,
                   backends: Sequence[str] = ("eager", "onnxruntime"), runs: int = 50, warmup: int = 10,
                   rounds: int = 10, threads: int | None = None, layers: bool = True, layer_runs: int = 5,
                   top: int = 15) -> dict[str, Any]:
    """Compare two models on the same inputs: figures, reductions, latency per backend (alternating), verdicts and
    the per-layer table. Returns the ``profile.json`` content.

    A backend that fails here (``torch.compile`` on a model it cannot compile) is recorded with its ``error`` and
    logged as a warning; the other backends still run. ``cuda`` without CUDA fails before any timing.
    """
    from prunekit.measure.macs import batch_size_of

    check_backends(backends)
    batch = batch_size_of(example_inputs)
    fig_b, fig_p = model_figures(baseline, example_inputs), model_figures(pruned, example_inputs)
    out: dict[str, Any] = {
        "batch_size": batch, "threads": threads or torch.get_num_threads(), "runs": runs, "warmup": warmup,
        "rounds": rounds, "baseline": fig_b, "pruned": fig_p,
        **{f"{k}_reduction": _reduction(fig_b[k], fig_p[k]) for k in ("params", "macs", "flops")},
        "latency_reduction": {}, "latency_efficiency": {}, "backends": {},
        "machine": machine_state(),
    }
    macs_red = out["macs_reduction"] or 0.0
    for name in backends:
        log.info("profile: timing baseline and pruned alternately on %s (batch %d, %d runs in %d rounds)",
                 name, batch, runs, rounds)
        try:
            st = compare_latency({"baseline": baseline, "pruned": pruned}, example_inputs, name, runs, warmup,
                                 threads, rounds)
        except BackendUnavailable as e:
            log.warning("profile: %s skipped: %s", name, e)
            out["backends"][name] = {"error": str(e)}
            continue
        b, p = st["baseline"], st["pruned"]
        lat_red = 1 - p.median_ms / b.median_ms
        per_round = sorted(1 - pr / br for br, pr in zip(b.round_medians_ms, p.round_medians_ms))
        spread = (percentile(per_round, 10), percentile(per_round, 90)) if len(per_round) > 1 else None
        eff = lat_red / macs_red if macs_red > 0 else None
        out["latency_reduction"][name] = lat_red
        out["latency_efficiency"][name] = eff
        out["backends"][name] = {
            "baseline": b.to_dict(), "pruned": p.to_dict(), "speedup": b.median_ms / p.median_ms,
            "latency_reduction": lat_red, "latency_reduction_p10_p90": list(spread) if spread else None,
            "latency_efficiency": eff, "verdict": verdict(macs_red, lat_red, name, batch, spread)}
        log.info("profile: %s", out["backends"][name]["verdict"])
    if layers:
        log.info("profile: per-layer times (torch eager, %d forwards each)", layer_runs)
        lt = layer_times_many({"baseline": baseline, "pruned": pruned}, example_inputs, layer_runs, threads=threads)
        lb, lp = lt["baseline"], lt["pruned"]
        out["layers"] = {"backend": "eager", "baseline_total_ms": lb["total_ms"], "pruned_total_ms": lp["total_ms"],
                         "baseline_forward_ms": lb["forward_ms"], "pruned_forward_ms": lp["forward_ms"],
                         "rows": compare_layers(lb, lp, top)}
    return out


def latency_metrics(model: nn.Module, example_inputs: Any, backends: Sequence[str] = ("eager",), runs: int = 50,
                    warmup: int = 10, threads: int | None = None) -> dict[str, dict[str, Any]]:
    """``{backend: latency statistics}`` of one model (what ``prunekit eval --latency`` adds to its metrics).

    Example:
        >>> m = latency_metrics(model, runs.example_inputs(spec, 1), ["eager", "onnxruntime"], threads=2)
        >>> print(format_latency(m))
    """
    from prunekit.measure.latency import measure_latency

    check_backends(backends)
    out: dict[str, dict[str, Any]] = {}
    for name in backends:
        try:
            out[name] = measure_latency(model, example_inputs, name, runs, warmup, threads).to_dict(with_times=False)
        except BackendUnavailable as e:
            log.warning("latency: %s skipped: %s", name, e)
            out[name] = {"error": str(e)}
    return out


def format_latency(latency: dict[str, dict[str, Any]]) -> str:
    """One line per backend: median, p90, p99, std (ms) and throughput."""
    lines = []
    for name, s in latency.items():
        if "error" in s:
            lines.append(f"{name:12} skipped: {s['error']}")
        else:
            lines.append(f"{name:12} median {s['median_ms']:.3f} ms  p90 {s['p90_ms']:.3f}  p99 {s['p99_ms']:.3f}  "
                         f"std {s['std_ms']:.3f}  {s['throughput']:.1f} samples/s  (batch {s['batch_size']}, "
                         f"{s['threads']} threads, {s['runs']} runs)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- formatting
def _fmt_count(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}".replace("+", "")


def format_profile(p: dict[str, Any]) -> str:
    """The profile as plain-text tables (figures and reductions, latency per backend, verdicts, per-layer)."""
    lines = [f"{'':24}{'baseline':>14}{'pruned':>14}{'reduction':>11}"]
    for k, label in (("params", "params"), ("macs", "MACs / sample"), ("flops", "FLOPs / sample")):
        lines.append(f"{label:24}{_fmt_count(p['baseline'][k]):>14}{_fmt_count(p['pruned'][k]):>14}"
                     f"{_pct(p[f'{k}_reduction']):>11}")
    lines.append(f"latency (ms, batch {p['batch_size']}, {p['threads']} threads, median of {p['runs']}, "
                 f"alternating in {p['rounds']} rounds)")
    for name, r in p["backends"].items():
        if "error" in r:
            lines.append(f"  {name:22}skipped: {r['error']}")
            continue
        b, q = r["baseline"], r["pruned"]
        lines.append(f"  {name + ' median':22}{b['median_ms']:>14.3f}{q['median_ms']:>14.3f}"
                     f"{_pct(r['latency_reduction']):>11}   efficiency "
                     + ("-" if r["latency_efficiency"] is None else f"{r['latency_efficiency']:.2f}"))
        for key in ("p90_ms", "p99_ms", "std_ms"):
            lines.append(f"  {'  ' + key[:-3]:22}{b[key]:>14.3f}{q[key]:>14.3f}")
        lines.append(f"  {'  samples/s':22}{b['throughput']:>14.1f}{q['throughput']:>14.1f}"
                     f"{'x' + format(r['speedup'], '.2f'):>11}")
    lines += ["", *[r["verdict"] for r in p["backends"].values() if "verdict" in r]]
    if "layers" in p:
        lt = p["layers"]
        lines += ["", f"per layer (torch eager, profiled alternately; ms of ops per forward, median: total "
                      f"{lt['baseline_total_ms']:.2f} -> {lt['pruned_total_ms']:.2f} ms of ops; profiled forward "
                      f"{lt['baseline_forward_ms']:.2f} -> {lt['pruned_forward_ms']:.2f} ms incl. Python and hooks)",
                  f"{'module':34}{'type':16}{'ms':>9}{'->':>9}{'time':>8}{'share':>7}{'MACs':>11}{'->':>11}{'MACs':>8}"]
        for r in lt["rows"]:
            lines.append(f"{r['name'][:33]:34}{r['type'][:15]:16}{r['baseline_ms']:>9.3f}{r['pruned_ms']:>9.3f}"
                         f"{_pct(r['time_reduction']):>8}{r['baseline_share']:>7.1%}{_fmt_count(r['baseline_macs']):>11}"
                         f"{_fmt_count(r['pruned_macs']):>11}{_pct(r['macs_reduction']):>8}")
    return "\n".join(lines)
