"""Sweep results: one row per point (settings, metrics, top-1 drop, cuts), the Pareto fronts, the best point meeting
the targets, and ``results.json`` / ``results.csv`` / ``pareto.png`` in the sweep folder (``prunekit sweep``).

Example:
    >>> res = collect_results("runs/sweep")
    >>> [p["point"] for p in res.points if p.get("pareto")]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit import runs
from prunekit._io import atomic_write_json, atomic_write_text
from prunekit.report.pareto import pareto_front
from prunekit.report.targets import DEFAULT_TARGETS, check_targets, describe_targets, meets_targets

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ results
_METRICS = ("top1", "top5", "macs", "params", "latency_ms")
_CUTS = (("macs", "macs_reduction"), ("params", "params_reduction"), ("latency_ms", "latency_reduction"))


@dataclass
class SweepResult:
    """What ``run_sweep`` / ``collect_results`` return (the content of ``results.json``)."""

    out: Path
    points: list[dict[str, Any]]  # one row per point: point, status, settings, metrics, ...
    front: list[str]  # names of the points on the top-1 vs MACs Pareto front, by MACs
    best: dict[str, Any] | None  # the highest top-1 among the points meeting the targets
    targets: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.points if p["status"] != "ok"]


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def scan_points(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for f in sorted((out / "points").glob("*/point.json")):
        info = read_json(f)
        if info and "settings" in info and "index" in info:
            found.append((f.parent, info))
    return found


def point_row(out: Path, d: Path, info: dict[str, Any]) -> dict[str, Any]:
    """One results row: settings, the final stage's metrics, the baseline's, the top-1 drop and the cuts."""
    row: dict[str, Any] = {"index": info["index"], "point": info["point"], "status": info.get("status", "pending"),
                           "settings": info["settings"]}
    final = read_json(d / info["final_dir"] / runs.METRICS) or {} if row["status"] == "ok" else {}
    base = read_json(Path(info["baseline_dir"]) / runs.METRICS) or {} if info.get("baseline_dir") else {}
    row.update({k: final[k] for k in _METRICS if final.get(k) is not None})
    row.update({f"baseline_{k}": base[k] for k in _METRICS if base.get(k) is not None})
    if "top1" in row and "baseline_top1" in row:
        row["top1_drop"] = row["baseline_top1"] - row["top1"]
    for k, name in _CUTS:
        if k in row and row.get(f"baseline_{k}"):
            row[name] = 1 - row[k] / row[f"baseline_{k}"]
    row.update(trials=info.get("trials"), runs=info.get("runs", 0), seconds=info.get("seconds"),
               error=info.get("error"), dir=str(d.relative_to(out)) if d.is_relative_to(out) else str(d))
    return {k: v for k, v in row.items() if v is not None}



def meets(row: dict[str, Any], targets: Mapping[str, float]) -> bool:
    return row["status"] == "ok" and meets_targets(row, targets)


def collect_results(out: str | Path, targets: Mapping[str, float] | None = None) -> SweepResult:
    """Read every point of the sweep folder ``out``: rows, the top-1 vs MACs Pareto front, the best point.

    Example:
        >>> res = collect_results("runs/sweep")
        >>> [p["point"] for p in res.points if p.get("pareto")]
    """
    out = Path(out).resolve()
    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    rows = [point_row(out, d, info) for d, info in scan_points(out)]
    rows.sort(key=lambda r: r["index"])
    fronts = {}
    for cost in ("macs", "latency_ms"):
        cand = [r for r in rows if r["status"] == "ok" and cost in r and "top1" in r]
        fronts[cost] = [cand[i]["point"] for i in pareto_front([(r[cost], r["top1"]) for r in cand])]
    ok = [r for r in rows if meets(r, targets)]
    best = max(ok, key=lambda r: (r["top1"], -r.get("macs", math.inf)), default=None)
    for r in rows:
        r["pareto"] = r["point"] in fronts["macs"]
        if fronts["latency_ms"]:
            r["pareto_latency"] = r["point"] in fronts["latency_ms"]
        r["meets_targets"] = meets(r, targets)
    return SweepResult(out, rows, fronts["macs"], best, dict(targets))


def write_results(out: str | Path, targets: Mapping[str, float] | None = None, plot: bool = True) -> SweepResult:
    """Write ``results.json``, ``results.csv`` (and ``pareto.png``) of the sweep folder ``out``."""
    res = collect_results(out, targets)
    lat = [r["point"] for r in res.points if r.get("pareto_latency")]
    atomic_write_json(res.out / "results.json", {
        "targets": res.targets, "best": res.best["point"] if res.best else None, "pareto_front": res.front,
        **({"pareto_front_latency": lat} if lat else {}), "points": res.points})
    keys = list(dict.fromkeys(k for r in res.points for k in r["settings"]))
    cols = ["index", "point", "status", *keys]
    cols += [c for c in ("top1", "top5", "macs", "params", "latency_ms", "baseline_top1", "baseline_macs",
                         "baseline_params", "baseline_latency_ms", "top1_drop", "macs_reduction", "params_reduction",
                         "latency_reduction", "pareto", "pareto_latency", "meets_targets", "trials", "runs",
                         "seconds", "error", "dir") if any(c in r for r in res.points)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in res.points:
        flat = {**r, **r["settings"], "trials": " ".join(map(str, r.get("trials", [])))}
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})
    atomic_write_text(res.out / "results.csv", buf.getvalue())
    if plot and any(r["status"] == "ok" and "macs" in r for r in res.points):
        _plot(res, res.out / "pareto.png")
    return res


def _plot(res: SweepResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("sweep: matplotlib is missing, so %s was not drawn (pip install 'prunekit[plots]')", path)
        return
    ok = [r for r in res.points if r["status"] == "ok" and "top1" in r]
    costs = [c for c in ("macs", "latency_ms") if any(c in r for r in ok)]
    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        scale, unit = (1e6, "MACs (M)") if cost == "macs" else (1.0, "latency (ms)")
        pts = [r for r in ok if cost in r]
        front = [r for r in pts if r.get("pareto" if cost == "macs" else "pareto_latency")]
        front.sort(key=lambda r: r[cost])
        ax.scatter([r[cost] / scale for r in pts], [r["top1"] for r in pts], c="0.6", s=18, label="points")
        ax.step([r[cost] / scale for r in front], [r["top1"] for r in front], where="post", c="C0", marker="o",
                label="Pareto front")
        for r in pts:
            ax.annotate(str(r["index"]), (r[cost] / scale, r["top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        bases = {(r[f"baseline_{cost}"], r["baseline_top1"]) for r in pts if f"baseline_{cost}" in r
                 and "baseline_top1" in r}
        if bases:
            ax.scatter([b[0] / scale for b in bases], [b[1] for b in bases], marker="*", s=150, c="C3",
                       label="baseline")
        if res.best and cost in res.best:
            ax.scatter([res.best[cost] / scale], [res.best["top1"]], s=160, facecolors="none", edgecolors="C2",
                       linewidths=2, label=f"best meeting targets ({res.best['index']})")
        ax.set_xlabel(unit)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep {res.out.name}: {len(ok)} points; targets: {describe_targets(res.targets)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry point
