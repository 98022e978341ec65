"""The deployment bars of report.html: dense / pruned x float32 / int8 latency on each runtime (and eager float32),
from the ``deployment`` rows ``prunekit profile`` writes into ``profile.json`` when it is given int8 runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.report import html as H
from prunekit.report.collect import RunRecord
from prunekit.report.plots import new_figure, save
from prunekit.report.table import markdown_table

COLORS = {("dense", "float32"): "#9e9e9e", ("pruned", "float32"): "#4c72b0", ("dense", "int8"): "#dd8452",
          ("pruned", "int8"): "#c44e52"}


def deployment_rows(records: Sequence[RunRecord]) -> list[tuple[RunRecord, list[dict[str, Any]]]]:
    """The runs whose ``profile.json`` holds deployment rows, with their rows."""
    return [(r, r.profile["deployment"]["rows"]) for r in records
            if r.profile and (r.profile.get("deployment") or {}).get("rows")]


def plot_deployment(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One bar per variant (runtime, model, precision), one panel per batch size; the whisker is the spread of the
    rounds' medians, the label the speed-up against dense float32 on the same runtime."""
    batches = sorted({r["batch"] for r in rows})
    fig = new_figure(7.0, 1.2 + 2.6 * len(batches))
    for k, b in enumerate(batches):
        ax = fig.add_subplot(len(batches), 1, k + 1)
        mine = [r for r in rows if r["batch"] == b]
        names = [f"{r['model']} {r['precision']} ({r['runtime']})" for r in mine]
        med = [r["median_ms"] for r in mine]
        err = [[m - r["round_min_ms"] for m, r in zip(med, mine)], [r["round_max_ms"] - m for m, r in zip(med, mine)]]
        ax.barh(range(len(mine)), med, xerr=err, capsize=3, color=[COLORS.get((r["model"], r["precision"]), "#888")
                                                                   for r in mine])
        for i, r in enumerate(mine):
            label = f" {r['median_ms']:.2f} ms" + (f"  {r['speedup']:.2f}x" if r.get("speedup") else "")
            ax.annotate(label, (r["round_max_ms"], i), va="center", fontsize=7)
        ax.set_yticks(range(len(mine)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(r["round_max_ms"] for r in mine) * 1.35)
        ax.set(xlabel="latency (ms, median; whisker: rounds' lowest-highest median)",
               title=f"{title}batch {b}".strip())
        ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def deployment_section(records: Sequence[RunRecord], out: Path, figures: dict[str, Path]) -> tuple[str, str]:
    """(html, markdown) of the deployment bars and their table for every run that has them; empty when none."""
    html, md = [], []
    for k, (r, rows) in enumerate(deployment_rows(records)):
        path = plot_deployment(rows, out / f"deployment-{k + 1}.png", f"{r.label}: ")
        figures.setdefault("deployment", path)
        head = (f"Deployment latency of {r.label} (its profile.json): dense and pruned, float32 and int8, on each "
                "runtime, eager float32 for reference; timed alternately in one process, "
                f"{r.profile['deployment'].get('threads', '?')} threads. The runtime of each bar is in its name.")
        headers = ["model", "precision", "runtime", "batch", "median ms", "rounds ms", "speed-up"]
        cells = [[x["model"], x["precision"], x["runtime"], str(x["batch"]), f"{x['median_ms']:.3f}",
                  f"{x['round_min_ms']:.3f}-{x['round_max_ms']:.3f}",
                  f"{x['speedup']:.2f}x" if x.get("speedup") else "-"] for x in rows]
        html.append(H.para(head) + H.img(path, f"deployment latency of {r.label}") + H.table(headers, cells, 3))
        md.append(f"{head}\n\n![deployment latency]({path.name})\n\n" + markdown_table(headers, cells))
    return "\n".join(html), "\n\n".join(md)
