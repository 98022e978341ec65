"""The report's figures as PNG files (matplotlib's Agg canvas; no pyplot, so no global backend state is touched).

Each ``plot_*`` function writes one PNG and returns its path, or returns ``None`` when the runs hold nothing to
plot (no profile, no sparse run, ...); the report then says so in words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunekit.report import detect as D
from prunekit.report.collect import RunRecord, profile_latency_reduction
from prunekit.report.pareto import pareto_front

DPI = 110
# runs at or above this fraction of zero weights count as sparse (structured pruning leaves ~0)
SPARSE_AT = 0.01


def new_figure(width: float = 7.0, height: float = 4.2):
    """A figure with an Agg canvas attached (thread-safe, independent of pyplot's state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


# ------------------------------------------------------------------------------------------- accuracy vs MACs
MAX_LABELLED = 6  # more pruned runs than this: grouped by method instead of labelled one by one


def method_family(method: str) -> str:
    """``"variance+mean global macs=0.5"`` -> ``"variance+mean global"``: the method without its target."""
    return re.sub(r"\s+(macs|r)=\S+$", "", method) or method


def plot_accuracy_vs_macs(records: Sequence[RunRecord], path: str | Path,
                          targets: Mapping[str, float] | None = None) -> Path:
    """Top-1 vs MACs of every run, the Pareto front as a step line, and the goal region for a single baseline."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    pts = [(r.row["macs"] / 1e6, D.score(r.row)) for r in records]  # top-1, or mAP50-95 for a detector
    pruned = [(r, p) for r, p in zip(records, pts) if not r.is_baseline]
    for r, (x, y) in zip(records, pts):
        if r.is_baseline:
            ax.scatter([x], [y], marker="s", s=46, zorder=3, color="#444444", label=r.label)
    if len(pruned) > MAX_LABELLED:  # a sweep: one line per method (criterion, compensation, scope), no labels
        families: dict[str, list[tuple[float, float]]] = {}
        for r, p in pruned:
            families.setdefault(method_family(str(r.row.get("method", "-"))), []).append(p)
        for name, fp in families.items():
            fp.sort()
            ax.plot([p[0] for p in fp], [p[1] for p in fp], marker="o", ms=5, lw=1, zorder=3, label=name)
    else:
        for r, (x, y) in pruned:
            ax.scatter([x], [y], marker="o", s=46, zorder=3, label=r.label)
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(pts)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="black", lw=1.2,
                alpha=0.7, zorder=2, label="Pareto front")
    bases = {id(r.baseline): r.baseline for r in records if r.baseline is not None}
    if targets and len(bases) == 1:
        b = next(iter(bases.values()))
        if "macs" in targets:
            ax.axvline(b["macs"] * (1 - targets["macs"]) / 1e6, color="#2ca02c", ls="--", lw=1,
                       label=f"MACs cut {targets['macs']:.0%}")
        if "drop" in targets:
            base = b["top1"] if "top1" in b else 100 * b["map50_95"]
            ax.axhline(base - targets["drop"], color="#2ca02c", ls=":", lw=1,
                       label=f"{D.score_label([r.row for r in records])[:-4]} drop {targets['drop']:g} pts")
    ax.set_xlabel("MACs per sample (M)")
    ax.set_ylabel(D.score_label([r.row for r in records]))
    ax.set_title("Accuracy vs MACs (up and to the left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save(fig, path)


# ------------------------------------------------------------------------------------------- channels per layer
def plot_channels(before: Mapping[str, int], after: Mapping[str, Mapping[str, int]], path: str | Path) -> Path | None:
    """Grouped bars: channels per layer before (the baseline) and after, for each pruned run.

    Args:
        before: layer -> output channels of the baseline.
        after: run label -> (layer -> output channels).
    """
    layers = [n for n in before if any(n in a for a in after.values())]
    if not layers or not after:
        return None
    n_series = 1 + len(after)
    width = 0.8 / n_series
    fig = new_figure(min(24.0, max(7.0, 0.28 * len(layers) * n_series)), 4.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(layers))
    ax.bar([x - 0.4 + width / 2 for x in xs], [before[n] for n in layers], width, color="#bbbbbb", label="baseline")
    for k, (label, ch) in enumerate(after.items(), start=1):
        ax.bar([x - 0.4 + width / 2 + k * width for x in xs], [ch.get(n, 0) for n in layers], width, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(layers, rotation=90, fontsize=6 if len(layers) > 30 else 7)
    ax.set_ylabel("output channels")
    ax.set_title("Kept channels per layer (before / after)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


# ------------------------------------------------------------------------------------------- sparsity
def plot_sparsity(records: Sequence[RunRecord], path: str | Path) -> Path | None:
    """Fraction of zero weights per layer, one bar series per sparse run (``SPARSE_AT`` or more zeros overall)."""
    sparse = [r for r in records if r.scan is not None and r.scan.overall_sparsity >= SPARSE_AT]
    if not sparse:
        return None
    layers = list(dict.fromkeys(n for r in sparse for n in r.scan.sparsity))
    width = 0.8 / len(sparse)
    fig = new_figure(min(24.0, max(7.0, 0.28 * len(layers) * len(sparse))), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    for k, r in enumerate(sparse):
        ax.bar([x - 0.4 + width / 2 + k * width for x in range(len(layers))],
               [r.scan.sparsity.get(n, 0.0) for n in layers], width,
               label=f"{r.label} ({r.scan.overall_sparsity:.1%} overall)")
    ax.set_xticks(list(range(len(layers))))
    ax.set_xticklabels(layers, rotation=90, fontsize=6 if len(layers) > 30 else 7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of zero weights")
    ax.set_title("Per-layer sparsity")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


# ------------------------------------------------------------------------------------------- curves
def curve_segments(records: Sequence[RunRecord]) -> list[tuple[str, list[float], list[dict[str, Any]]]]:
    """``(label, x, rows)`` per distinct history: each run's epochs numbered 1..n, shifted past the epochs of its
    ancestors' histories so that a fine-tuning curve continues its baseline's training curve. Rows without
    ``epoch`` (PAT's pruning steps) are left out."""
    by_dir = {r.dir: r for r in records}
    out, seen = [], set()
    for r in records:
        if r.dir in seen:
            continue
        seen.add(r.dir)
        rows = _epoch_rows(r.history)
        if not rows:
            continue
        offset = 0.0
        for anc in r.lineage[1:]:
            offset += len(_epoch_rows(by_dir[anc].history if anc in by_dir else _history(anc)))
        out.append((r.label, [offset + i for i in range(1, len(rows) + 1)], rows))
    return out


def _epoch_rows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch rows of a history, in order (PAT restarts its epoch count at every step: rows are counted, not
    read from ``epoch``)."""
    return [h for h in history if isinstance(h.get("epoch"), (int, float))]


def _history(d: Path) -> list[dict[str, Any]]:
    from prunekit import runs

    try:
        return runs.read_history(d)
    except Exception:
        return []


def plot_curves(records: Sequence[RunRecord], path: str | Path) -> Path | None:
    """Validation top-1 and training loss per epoch, training then fine-tuning on one epoch axis."""
    segs = curve_segments(records)
    if not segs:
        return None
    fig = new_figure(10.0, 4.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, xs, rows in segs:
        phase = rows[0].get("phase", "")
        style = "-" if phase in ("train", "") else "--"
        pts = [(x, D.history_score(h)) for x, h in zip(xs, rows) if D.history_score(h) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, marker="o", ms=3, label=f"{label} ({phase})" if phase else label)
        pts = [(x, h["train_loss"]) for x, h in zip(xs, rows) if isinstance(h.get("train_loss"), (int, float))]
        if pts:
            ax2.plot(*zip(*pts), style, marker="o", ms=3, label=label)
    score = D.score_label([r.row for r in records])  # "top-1 (%)", or "mAP50-95 (%)" for detectors
    ax1.set(xlabel="epoch (training, then fine-tuning)", ylabel=f"validation {score}",
            title=f"Validation {score[:-4]}")
    ax2.set(xlabel="epoch (training, then fine-tuning)", ylabel="training loss", title="Training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


# ------------------------------------------------------------------------------------------- MACs vs latency
def plot_latency(records: Sequence[RunRecord], path: str | Path) -> Path | None:
    """MACs reduction vs latency reduction per backend, from each run's ``profile.json`` (diagonal: latency follows
    MACs exactly)."""
    pts = []  # (backend, label, macs_reduction, latency_reduction)
    for r in records:
        macs_red = r.profile.get("macs_reduction") if r.profile else None
        if not isinstance(macs_red, (int, float)):
            continue
        for backend, lat in profile_latency_reduction(r.profile).items():
            pts.append((backend, r.label, float(macs_red), lat))
    if not pts:
        return None
    fig = new_figure(6.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>P*X"
    backends = list(dict.fromkeys(p[0] for p in pts))
    for k, b in enumerate(backends):
        mine = [p for p in pts if p[0] == b]
        ax.scatter([100 * p[2] for p in mine], [100 * p[3] for p in mine], marker=markers[k % len(markers)], s=50,
                   label=b, zorder=3)
        for _, label, x, y in mine:
            ax.annotate(label, (100 * x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    hi = max(5.0, *(100 * max(p[2], p[3]) for p in pts)) * 1.1
    lo = min(0.0, *(100 * p[3] for p in pts)) * 1.1 - 3
    ax.plot([0, hi], [0, hi], color="#888888", ls="--", lw=1, label="latency cut = MACs cut")
    ax.set_xlim(0, hi)
    ax.set_ylim(lo, hi)
    ax.set(xlabel="MACs cut (%)", ylabel="latency cut (%)", title="FLOPs reduction vs latency reduction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


# ------------------------------------------------------------------------------------------- magnitudes
def plot_magnitudes(records: Sequence[RunRecord], path: str | Path) -> Path | None:
    """Distribution of log10 |w| of the layer weights, baselines and runs overlaid (exact zeros cannot sit on a log
    axis: their share is in each legend entry)."""
    scans = [(r.label, r.scan.magnitudes) for r in records if r.scan is not None and r.scan.magnitudes.numel()]
    logs = [m[m > 0].log10() for _, m in scans]
    if not any(v.numel() for v in logs):
        return None
    lo = min(float(v.min()) for v in logs if v.numel())
    hi = max(float(v.max()) for v in logs if v.numel())
    # from the 0.1% quantile (at most eight decades below the largest): smaller values pile into the first bin
    lo = max(lo, hi - 8, min(float(v.quantile(0.001)) for v in logs if v.numel()))
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for (label, mags), v in zip(scans, logs):
        zero = 1 - v.numel() / mags.numel()
        if v.numel():
            ax.hist(v.clamp(min=lo).numpy(), bins=60, range=(lo, hi + 1e-9), histtype="step", lw=1.3, density=True,
                    label=f"{label} ({zero:.1%} zeros)")
    ax.set(xlabel="log10 |weight|", ylabel="density", title="Weight magnitude distribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)
