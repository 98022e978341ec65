"""``make_report``: run directories in, ``report.html`` + ``report.md`` + one PNG per figure out.

Example:
    >>> res = make_report(["runs/base", "runs/pruned", "runs/finetuned"], "runs/report")
    >>> res.html, [r.row["top1"] for r in res.records]
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prunekit._io import atomic_write_text
from prunekit.errors import ConfigError
from prunekit.report import detect as D
from prunekit.report import html as H
from prunekit.report import plots
from prunekit.report.collect import RunRecord, collect_runs, find_sensitivity, profile_latency_reduction, split_notes
from prunekit.report.table import markdown_table, text_table
from prunekit.report.targets import DEFAULT_TARGETS, check_targets, describe_targets

log = logging.getLogger(__name__)

# (id, heading) of every section of report.html, in order; each is always present (with a note when empty)
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("accuracy", "Accuracy vs MACs"),
    ("channels", "Kept channels per layer"),
    ("sparsity", "Per-layer sparsity"),
    ("curves", "Training and fine-tuning curves"),
    ("latency", "FLOPs reduction vs latency reduction"),
    ("magnitudes", "Weight magnitude distribution"),
    ("graph", "Dependency graph"),
    ("failures", "Failure cases"),
)


@dataclass
class ReportResult:
    """What ``make_report`` wrote and read."""

    out: Path
    records: list[RunRecord]
    targets: dict[str, float]
    html: Path
    markdown: Path
    figures: dict[str, Path] = field(default_factory=dict)  # section id -> PNG (or copied graph file)
    sensitivity: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)  # one line per run that misses the targets


def make_report(run_dirs: Sequence[str | Path], out: str | Path, targets: Mapping[str, Any] | None = None,
                sensitivity: str | Path | None = None, add_baselines: bool = True,
                title: str = "prunekit report") -> ReportResult:
    """Read run directories and write ``out/report.html`` (self-contained), ``out/report.md`` and the PNGs.

    Args:
        run_dirs: run directories to compare (their baselines are added when not listed, see ``add_baselines``).
        out: output folder (created; existing report files in it are replaced).
        targets: goals, e.g. ``{"macs": 0.4, "drop": 1.5}`` (the default).
        sensitivity: a ``sensitivity.json`` (or its folder); by default the first one kept in a listed run or one
            of its ancestors (``DIR/sensitivity/sensitivity.json``) is used.
        add_baselines: also show each baseline a listed run descends from.
        title: the page title.

    Raises:
        ConfigError: bad targets, no run directory, ``out`` is one of the run directories.
        RunDirError: a run directory is missing or corrupt; the sensitivity file is unreadable.
    """
    from prunekit.report.sensitivity import read_sensitivity

    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if any(out.resolve() == Path(d).resolve() for d in run_dirs):
        raise ConfigError(f"--out {str(out)!r} is one of the run directories; write the report somewhere else")
    records = collect_runs(run_dirs, targets, add_baselines=add_baselines)
    sens_path = Path(sensitivity) if sensitivity is not None else find_sensitivity(records)
    sens = read_sensitivity(sens_path) if sens_path is not None else None
    out.mkdir(parents=True, exist_ok=True)
    res = ReportResult(out=out, records=records, targets=targets, html=out / "report.html",
                       markdown=out / "report.md", sensitivity=sens)
    goals = describe_targets(targets, D.score_name([r.row for r in records]))
    sections, md = [], [f"# {title}", "", f"Targets: {goals}.", ""]
    for sid, heading in SECTIONS:
        body_html, body_md = _SECTION_BUILDERS[sid](records, res)
        sections.append(H.section(sid, heading, body_html))
        md += [f"## {heading}", "", body_md, ""]
    subtitle = (f"{len(records)} runs; targets: {goals}; generated "
                f"{datetime.now().strftime('%Y-%m-%d %H:%M')}")
    atomic_write_text(res.html, H.page(title, sections, subtitle, nav=SECTIONS))
    atomic_write_text(res.markdown, "\n".join(md).rstrip() + "\n")
    log.debug("report: wrote %s, %s and %d figures", res.html, res.markdown, len(res.figures))
    return res


# ------------------------------------------------------------------------------------------------ sections
def _summary(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    headers, cells = text_table([r.row for r in records])
    classes = ["base" if r.is_baseline else ("miss" if r.missed else "met") for r in records]
    text_cols = 4
    backends = sorted({next(iter(profile_latency_reduction(r.profile)), "") for r in records} - {""})
    lat = (f"`latency cut` is the {' / '.join(backends)} figure of the run's `profile.json` (timed alternately with "
           "its baseline; every backend in the latency section)" if backends else
           "`latency cut` compares the latency each run measured on its own")
    rows = [r.row for r in records]
    score = D.score_name(rows)
    lines = [f"{D.metric_columns(rows)} are on each dataset's test split (the validation split, carved from the "
             f"training data, only picked epochs). Reductions and the {score} drop are against the baseline each run "
             "descends from (its `stage: train` "
             f"ancestor, found through `from`); `Pareto` marks the runs no other run beats on both {score} and MACs; "
             "`sparsity` is the fraction of exact zeros among the weights of the conv and linear layers (biases and "
             f"norms not counted); {lat}.", *filter(None, [D.summary_note(rows)]),
             *split_notes(records)]
    body = H.table(headers, cells, text_cols, classes) + "".join(H.para(line) for line in lines)
    dirs = [[r.label, str(r.dir), str(r.baseline_dir) if r.baseline_dir else "-"] for r in records]
    body += H.table(["run", "directory", "baseline"], dirs, text_cols=3)
    md = markdown_table(headers, cells) + "\n\n" + "\n\n".join(lines) + "\n\n" + markdown_table(
        ["run", "directory", "baseline"], dirs)
    return body, md


def _accuracy(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    path = plots.plot_accuracy_vs_macs(records, res.out / "accuracy_vs_macs.png", res.targets)
    res.figures["accuracy"] = path
    front = [r.label for r in sorted(records, key=lambda r: r.row["macs"]) if r.row.get("pareto")]
    text = f"Pareto front (cheapest first): {', '.join(front)}."
    score = D.score_name([r.row for r in records])
    return H.img(path, f"{score} vs MACs with the Pareto front") + H.para(text), \
        f"![{score} vs MACs]({path.name})\n\n" + text


def _channels(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    from prunekit.report.weights import layer_channels, reference_channels

    html, md = [], []
    groups: dict[Path | None, list[RunRecord]] = {}
    for r in records:
        if not r.is_baseline:
            groups.setdefault(r.baseline_dir, []).append(r)
    for k, (base_dir, rs) in enumerate(groups.items()):
        before = layer_channels(base_dir) if base_dir else reference_channels(rs[0].dir)
        if not before:
            continue
        series: dict[tuple, list[str]] = {}  # identical channel maps (a prune and its fine-tune) share one series
        maps: dict[tuple, dict[str, int]] = {}
        for r in rs:
            ch = layer_channels(r.dir)
            if ch == before:
                continue
            key = tuple(sorted(ch.items()))
            series.setdefault(key, []).append(r.label)
            maps[key] = ch
        if not series:
            continue
        after = {", ".join(labels): maps[key] for key, labels in series.items()}
        name = "channels.png" if k == 0 else f"channels-{k + 1}.png"
        path = plots.plot_channels(before, after, res.out / name)
        if path is None:
            continue
        res.figures.setdefault("channels", path)
        base_label = next((r.label for r in records if r.dir == base_dir), str(base_dir) if base_dir else
                          "unpruned architecture")
        changed = [n for n in before if any(a.get(n, before[n]) != before[n] for a in after.values())]
        headers = ["layer", f"baseline ({base_label})", *after]
        cells = [[n, str(before[n]), *(str(a.get(n, "-")) for a in after.values())] for n in changed]
        html.append(H.img(path, f"kept channels per layer against {base_label}") + H.table(headers, cells))
        md.append(f"![kept channels per layer]({path.name})\n\n" + markdown_table(headers, cells))
    if not html:
        msg = "No run has fewer channels than its baseline (no structured pruning among these runs)."
        return H.note(msg), f"_{msg}_"
    return "\n".join(html), "\n\n".join(md)


def _sparsity(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    path = plots.plot_sparsity(records, res.out / "sparsity.png")
    if path is None:
        msg = (f"No sparse run: every run has fewer than {plots.SPARSE_AT:.0%} zero weights (structured pruning "
               "removes channels instead of zeroing weights).")
        return H.note(msg), f"_{msg}_"
    res.figures["sparsity"] = path
    sparse = [r for r in records if r.scan is not None and r.scan.overall_sparsity >= plots.SPARSE_AT]
    cells = [[r.label, f"{r.scan.overall_sparsity:.1%}", f"{max(r.scan.sparsity.values()):.1%}",
              f"{min(r.scan.sparsity.values()):.1%}"] for r in sparse]
    headers = ["run", "overall", "max layer", "min layer"]
    return (H.img(path, "per-layer sparsity") + H.table(headers, cells),
            f"![per-layer sparsity]({path.name})\n\n" + markdown_table(headers, cells))


def _curves(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    path = plots.plot_curves(records, res.out / "curves.png")
    if path is None:
        msg = "No run has a history.jsonl with epochs (pruning-only runs have none)."
        return H.note(msg), f"_{msg}_"
    res.figures["curves"] = path
    text = "Fine-tuning epochs continue the epoch axis of the training run they descend from (dashed lines)."
    return H.img(path, "training and fine-tuning curves") + H.para(text), f"![curves]({path.name})\n\n{text}"


def _latency(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    from prunekit.report.deploy import deployment_section

    deploy_html, deploy_md = deployment_section(records, res.out, res.figures)
    path = plots.plot_latency(records, res.out / "macs_vs_latency.png")
    if path is None:
        msg = ("No run has a profile.json; measure one with `prunekit profile --baseline BASE --pruned RUN` "
               "(it writes RUN/profile.json).")
        return (deploy_html or H.note(msg)), (deploy_md or f"_{msg}_")
    res.figures["latency"] = path
    headers = ["run", "backend", "MACs cut", "latency cut", "efficiency", "verdict"]
    cells = []
    for r in records:
        for b, lat in profile_latency_reduction(r.profile).items():
            macs = r.profile.get("macs_reduction") or 0.0
            eff = lat / macs if macs > 0 else None
            verdict = (r.profile.get("backends", {}).get(b) or {}).get("verdict", "")
            cells.append([r.label, b, f"{macs:.1%}", f"{lat:.1%}", "-" if eff is None else f"{eff:.2f}", verdict])
    return (H.img(path, "MACs reduction vs latency reduction") + H.table(headers, cells, text_cols=2) + deploy_html,
            f"![MACs vs latency]({path.name})\n\n" + markdown_table(headers, cells) + "\n\n" + deploy_md)


def _magnitudes(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    path = plots.plot_magnitudes(records, res.out / "weight_magnitudes.png")
    if path is None:
        msg = "No weights to plot."
        return H.note(msg), f"_{msg}_"
    res.figures["magnitudes"] = path
    text = ("Distribution of log10 |w| over all conv/linear weights (sampled to at most 200 000 per run); the share "
            "of exact zeros is in the legend.")
    return H.img(path, "weight magnitude distribution") + H.para(text), f"![weight magnitudes]({path.name})\n\n{text}"


def _graph(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    seen, html, md = set(), [], []
    for r in records:
        for d in r.lineage:
            for name in ("graph.svg", "graph.png"):
                g = d / name
                if g.is_file() and g.resolve() not in seen:
                    seen.add(g.resolve())
                    dest = res.out / f"graph-{len(seen)}{g.suffix}"
                    shutil.copyfile(g, dest)
                    res.figures.setdefault("graph", dest)
                    html.append(H.para(f"{g}") + H.img(g, f"dependency graph of {d.name}"))
                    md.append(f"![dependency graph of {d.name}]({dest.name})")
                    break
    if not html:
        msg = ("No run has a graph.svg or graph.png; draw one with `prunekit graph --from RUN --out RUN/graph.svg`.")
        return H.note(msg), f"_{msg}_"
    return "\n".join(html), "\n\n".join(md)


def _failures(records: list[RunRecord], res: ReportResult) -> tuple[str, str]:
    from prunekit.report.sensitivity import plot_sensitivity, ratio_caps

    html, md = [], []
    miss = [r for r in records if r.missed]
    res.failures = [f"{r.label}: {'; '.join(r.missed)}" for r in miss]
    if miss:
        head = f"{len(miss)} of {sum(not r.is_baseline for r in records)} runs miss the targets " \
               f"({describe_targets(res.targets, D.score_name([r.row for r in records]))}):"
        html.append(H.para(head) + H.bullets(res.failures))
        md.append(head + "\n\n" + "\n".join(f"- {f}" for f in res.failures))
    elif any(not r.is_baseline for r in records):
        msg = f"Every run meets the targets ({describe_targets(res.targets, D.score_name([r.row for r in records]))})."
        html.append(H.para(msg))
        md.append(msg)
    else:
        msg = "Only baselines were given: no pruned run to check against the targets."
        html.append(H.note(msg))
        md.append(f"_{msg}_")
    if res.sensitivity is None:
        msg = "No sensitivity result; run `prunekit sensitivity --from BASE` to find the most sensitive layers."
        html.append(H.note(msg))
        md.append(f"_{msg}_")
        return "\n".join(html), "\n\n".join(md)
    sens = res.sensitivity
    top = [g for g in sens["groups"] if g.get("mean_drop") is not None][:5]
    caps = ratio_caps(sens, res.targets.get("drop", 1.5))
    headers = ["group (root layer)", "layers", "channels", "mean top-1 drop", *[f"r={r:g}" for r in sens["ratios"]],
               f"cap at {res.targets.get('drop', 1.5):g} pts"]
    cells = []
    for g in top:
        by_ratio = {x["ratio"]: x for x in g["results"]}
        cells.append([g["name"], str(len(g["layers"])), str(g.get("channels", "-")), f"{g['mean_drop']:.2f}",
                      *(f"{by_ratio[r]['top1']:.2f}" if "top1" in by_ratio.get(r, {}) else "-"
                        for r in sens["ratios"]), f"{caps.get(g['regex'], 0.0):g}"])
    head = (f"Most sensitive groups ({sens['criterion']}, each pruned alone, no fine-tuning; baseline top-1 "
            f"{sens['baseline']['top1']:.2f}% on {sens['samples']} samples). Cells are top-1 after pruning.")
    path = plot_sensitivity(sens, res.out / "sensitivity.png")
    res.figures["sensitivity"] = path
    html.append(H.para(head) + H.table(headers, cells, text_cols=1) + H.img(path, "layer sensitivity"))
    md.append(head + "\n\n" + markdown_table(headers, cells) + f"\n\n![layer sensitivity]({path.name})")
    return "\n".join(html), "\n\n".join(md)


_SECTION_BUILDERS = {"summary": _summary, "accuracy": _accuracy, "channels": _channels, "sparsity": _sparsity,
                     "curves": _curves, "latency": _latency, "magnitudes": _magnitudes, "graph": _graph,
                     "failures": _failures}
