"""Where the time goes, per module: ``torch.profiler`` ranges around every module's forward, and its MACs.

Each module's time is *exclusive*: the torch ops run directly in its forward, not in a child module's, so a leaf
layer (conv, linear, norm) gets its kernel time and a block gets the functional work it does itself (residual adds,
attention's matmuls/softmax in a self-attention module). The rows add up to the op time of the forward pass; the
Python between ops (and the profiler's own hooks) is reported apart as ``forward_ms - total_ms``.

Example:
    >>> t = layer_times(model, torch.randn(1, 3, 224, 224), runs=5)
    >>> t["layers"][:3]    # [{"name": "layer1.0.conv2", "type": "Conv2d", "ms": 1.9, "macs": ...}, ...]
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.batch import call_model
from prunekit.measure.latency import torch_threads
from prunekit.measure.macs import frozen

_PREFIX = "prunekit.module:"
ROOT = "<root>"


def _children(names: list[str]) -> dict[str, list[str]]:
    """Direct children of each module name ("" is the root)."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for n in names:
        if n:
            parent = n.rpartition(".")[0]
            while parent not in out:  # a gap (an unnamed container) attaches to the nearest named ancestor
                parent = parent.rpartition(".")[0]
            out[parent].append(n)
    return out


def _exclusive(inclusive: dict[str, float], children: dict[str, list[str]]) -> dict[str, float]:
    return {n: max(0.0, v - sum(inclusive.get(c, 0.0) for c in children.get(n, []))) for n, v in inclusive.items()}


@torch.no_grad()
def module_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Exclusive MACs of each module for one forward of ``example_inputs`` (the whole batch)."""
    names = list(_timed_modules(model))
    with frozen(model), FlopCounterMode(display=False) as fc:
        call_model(model, example_inputs)
    root, known = type(model).__name__, set(names)
    inclusive: dict[str, float] = {}
    for key, ops in fc.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else None
        if name is not None and name in known:
            inclusive[name] = float(sum(ops.values())) / 2
    return {n: int(v) for n, v in _exclusive(inclusive, _children(names)).items()}


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _timed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that get a profiler range: all but pure containers (whose time is their children's plus a loop)."""
    return {n: m for n, m in model.named_modules() if not n or not isinstance(m, CONTAINERS)}


@torch.no_grad()
def layer_times_many(models: dict[str, nn.Module], example_inputs: Any, runs: int = 5, warmup: int = 2,
                     threads: int | None = None) -> dict[str, dict[str, Any]]:
    """:func:`layer_times` of several models, profiled *alternately* (forward by forward) in one profiler session,
    so that a machine slowing down hits them alike. Each module's time is the median over its calls."""
    timed = {k: _timed_modules(m) for k, m in models.items()}
    own, wall = _own_times(_profile(models, timed, example_inputs, runs, warmup, threads))
    out = {}
    for k, m in models.items():
        rows = []
        macs = module_macs(m, example_inputs)
        for name, mod in timed[k].items():
            ts = own.get(f"{k}:{name or ROOT}")
            if ts:
                calls = max(1, round(len(ts) / runs))
                rows.append({"name": name or ROOT, "type": type(mod).__name__,
                             "ms": statistics.median(ts) * calls, "calls": calls, "macs": macs.get(name, 0)})
        total = math.fsum(r["ms"] for r in rows)
        for r in rows:
            r["share"] = r["ms"] / total if total > 0 else 0.0
        rows.sort(key=lambda r: -r["ms"])
        root_wall = wall.get(f"{k}:{ROOT}")
        out[k] = {"total_ms": total, "forward_ms": statistics.median(root_wall) if root_wall else None,
                  "runs": runs, "layers": rows}
    return out


def _profile(models: dict[str, nn.Module], timed: dict[str, dict[str, nn.Module]], example_inputs: Any, runs: int,
             warmup: int, threads: int | None) -> Any:
    """The profiler of ``runs`` alternating forwards of ``models``, each timed module inside a labelled range."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    # Kineto (the profiler's backend) logs "ERROR: gpuGetDeviceCount failed" on every CPU-only run of a CUDA build
    # of torch; CPU timing is unaffected, so only fatal messages are shown unless the user set a level
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    stack: list[Any] = []
    handles = []
    modes = {k: m.training for k, m in models.items()}

    def pre(label: str):
        def hook(module: nn.Module, args: Any) -> None:
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        return hook

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)

    try:
        with torch_threads(threads):
            for k, m in models.items():
                m.eval()
                for _ in range(warmup):
                    call_model(m, example_inputs)
                for name, mod in timed[k].items():
                    handles.append(mod.register_forward_pre_hook(pre(f"{_PREFIX}{k}:{name or ROOT}")))
                    handles.append(mod.register_forward_hook(post))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(runs):
                    for k in (list(models) if i % 2 == 0 else list(models)[::-1]):
                        call_model(models[k], example_inputs)
    finally:
        for h in handles:
            h.remove()
        while stack:
            stack.pop().__exit__(None, None, None)
        for k, m in models.items():
            m.train(modes[k])
    return prof


def _own_times(prof: Any) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(label -> own ms per call, label -> wall ms per call) of every labelled range.

    A module's own time = the torch ops directly inside its range (not in a child module's range); the Python
    between ops (and the profiler's hooks) is left out, so the rows add up to the op time of the forward.
    """
    own: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.name.startswith(_PREFIX):
            label = ev.name[len(_PREFIX):]
            ops = [c for c in ev.cpu_children if not c.name.startswith(_PREFIX)]
            own.setdefault(label, []).append(math.fsum(c.cpu_time_total for c in ops) / 1e3)  # us -> ms
            wall.setdefault(label, []).append(ev.cpu_time_total / 1e3)
    return own, wall


def layer_times(model: nn.Module, example_inputs: Any, runs: int = 5, warmup: int = 2,
                threads: int | None = None) -> dict[str, Any]:
    """Exclusive CPU time (ms per forward, median over ``runs``) and MACs of each module, from ``torch.profiler``.

    Returns ``{"total_ms": op time, "forward_ms": wall time of the profiled forward, "layers": [{"name", "type",
    "ms", "share", "calls", "macs"}, ...]}`` sorted by time; pure containers (``nn.Sequential``, ...) get no row.
    """
    return layer_times_many({"model": model}, example_inputs, runs, warmup, threads)["model"]


def compare_layers(baseline: dict[str, Any], pruned: dict[str, Any], top: int = 15) -> list[dict[str, Any]]:
    """Join two :func:`layer_times` results by module name: the ``top`` modules by baseline time, each with its
    time and MACs before and after and their reductions, then one ``(other modules)`` row with the rest."""
    b = {r["name"]: r for r in baseline["layers"]}
    p = {r["name"]: r for r in pruned["layers"]}
    order = sorted(set(b) | set(p), key=lambda n: -max(b.get(n, {}).get("ms", 0.0), p.get(n, {}).get("ms", 0.0)))

    def row(name: str, typ: str, b_ms: float, p_ms: float, b_macs: int, p_macs: int) -> dict[str, Any]:
        return {"name": name, "type": typ, "baseline_ms": b_ms, "pruned_ms": p_ms,
                "time_reduction": 1 - p_ms / b_ms if b_ms > 0 else None,
                "baseline_share": b_ms / baseline["total_ms"] if baseline["total_ms"] > 0 else 0.0,
                "baseline_macs": b_macs, "pruned_macs": p_macs,
                "macs_reduction": 1 - p_macs / b_macs if b_macs > 0 else None}

    rows = []
    for n in order[:top]:
        rb, rp = b.get(n, {}), p.get(n, {})
        rows.append(row(n, rb.get("type") or rp.get("type", "?"), rb.get("ms", 0.0), rp.get("ms", 0.0),
                        rb.get("macs", 0), rp.get("macs", 0)))
    rest = order[top:]
    if rest:
        rows.append(row(f"(other {len(rest)} modules)", "", sum(b.get(n, {}).get("ms", 0.0) for n in rest),
                        sum(p.get(n, {}).get("ms", 0.0) for n in rest), sum(b.get(n, {}).get("macs", 0) for n in rest),
                        sum(p.get(n, {}).get("macs", 0) for n in rest)))
    return rows
