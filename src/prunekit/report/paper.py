"""Published results shipped as data, and our run directories laid over them.

A ``PaperTable`` holds one table of a paper: the unpruned baseline and one row per prune ratio with the top-1
right after pruning (no fine-tuning), the top-1 after fine-tuning, MACs and parameters. Values the table does not
give (or that we could not verify) are ``None``; a JSON file can supply them (``load_paper(name, table_file)``).

Our runs are compared *relative to their own baseline*: retention = top-1 right after pruning / baseline top-1,
recovery = top-1 after fine-tuning / baseline top-1, and the fractions of MACs and parameters cut. Absolute
accuracies of different datasets are not comparable; these ratios at the same prune ratio are.

Example:
    >>> cmp = compare_with_paper("vbp-deit-tiny", ["runs/deit/2-prune", "runs/deit/3-finetune"])
    >>> cmp.rows[0]["retention"], cmp.rows[0]["paper_retention"]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prunekit import runs
from prunekit.errors import ConfigError, RunDirError
from prunekit.registry import Registry
from prunekit.report.collect import lineage, read_json

log = logging.getLogger(__name__)

ROW_KEYS = ("ratio", "top1_pruned", "top1", "macs", "params")


@dataclass(frozen=True)
class PaperTable:
    """One published table.

    Attributes:
        key: registry name (``vbp-deit-tiny``).
        title, citation, url: where the numbers come from.
        model, dataset: what they were measured on.
        base: unpruned ``{"top1": %, "macs": per-sample MACs, "params": count}``.
        rows: ``{"ratio", "top1_pruned", "top1", "macs", "params"}`` per prune ratio (``None`` = not given).
        ratio_meaning: what "prune ratio" removes in the paper (to build comparable runs).
        provenance: how the values were obtained, and which are missing.
    """

    key: str
    title: str
    citation: str
    url: str
    model: str
    dataset: str
    base: dict[str, float]
    rows: tuple[dict[str, float | None], ...]
    ratio_meaning: str
    provenance: str

    def row(self, ratio: float, tol: float = 1e-6) -> dict[str, float | None] | None:
        """The row of exactly this prune ratio (within ``tol``), or ``None``."""
        return next((r for r in self.rows if abs(float(r["ratio"]) - ratio) <= tol), None)

    @property
    def has_values(self) -> bool:
        return any(r.get(k) is not None for r in self.rows for k in ROW_KEYS if k != "ratio")


PAPERS: Registry[PaperTable] = Registry("paper")


def register_paper(table: PaperTable) -> PaperTable:
    PAPERS.register(table.key)(table)
    return table


# VBP, Table 10: DeiT-Tiny on ImageNet-1k. The baseline figures below are the ones this project was given; the
# per-ratio values could not be read from a copy of the paper we could verify, so they are left empty rather than
# guessed. Supply them with `--table FILE.json` (see docs/paper_comparison.md).
register_paper(PaperTable(
    key="vbp-deit-tiny",
    title="Variance-Based Pruning for Accelerating and Compressing Trained Networks, Table 10 (DeiT-Tiny)",
    citation="U. Berisha, J. Mehnert, A. P. Condurache. Variance-Based Pruning for Accelerating and Compressing "
             "Trained Networks. ICCV 2025. arXiv:2507.12988",
    url="https://arxiv.org/abs/2507.12988",
    model="DeiT-Tiny (timm deit_tiny_patch16_224)",
    dataset="ImageNet-1k (224 px)",
    base={"top1": 72.02, "macs": 1.26e9, "params": 5.72e6},
    rows=tuple({"ratio": round(0.05 * k, 2), "top1_pruned": None, "top1": None, "macs": None, "params": None}
               for k in range(1, 11)),
    ratio_meaning="fraction of the hidden neurons of every transformer MLP removed (attention untouched), scored by "
                  "post-activation variance, with the removed neurons' mean activations folded into the next "
                  "layer's bias; fine-tuned with knowledge distillation from the unpruned model",
    provenance="baseline top-1 72.02%, 1.26 GMACs and 5.72 M parameters as given to this project; the ratio grid "
               "5%..50% in steps of 5% follows the table's layout as described to us. The per-ratio values were "
               "not transcribed: no verifiable copy of the table was available offline. Pass them with --table.",
))


def load_paper(name: str, table_file: str | Path | None = None) -> PaperTable:
    """The registered table ``name``, with values from ``table_file`` (JSON) laid over it when given.

    The JSON file may hold ``"base"`` (a mapping) and ``"rows"`` (a list of mappings with ``ratio`` and any of
    ``top1_pruned``, ``top1`` (%), ``macs``, ``params`` (counts)); rows replace the registered row of the same
    ratio or are added. An optional ``"source"`` string is appended to the provenance.
    """
    table = PAPERS.get(name)
    if table_file is None:
        return table
    p = Path(table_file)
    if not p.is_file():
        raise ConfigError(f"--table: file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--table: {str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not (set(data) <= {"base", "rows", "source"}):
        raise ConfigError(f"--table: {str(p)!r} must be a JSON object with keys among base, rows, source")
    base = dict(table.base)
    for k, v in (data.get("base") or {}).items():
        if k not in ("top1", "macs", "params"):
            raise ConfigError(f"--table: base key {k!r} is unknown; valid: top1, macs, params")
        base[k] = _number(v, f"base.{k}")
    rows = {float(r["ratio"]): dict(r) for r in table.rows}
    for i, r in enumerate(data.get("rows") or []):
        if not isinstance(r, dict) or "ratio" not in r:
            raise ConfigError(f"--table: rows[{i}] must be an object with a 'ratio'")
        unknown = set(r) - set(ROW_KEYS)
        if unknown:
            raise ConfigError(f"--table: rows[{i}] has unknown key {sorted(unknown)[0]!r}; "
                              f"valid: {', '.join(ROW_KEYS)}")
        ratio = _number(r["ratio"], f"rows[{i}].ratio")
        if not 0 < ratio < 1:
            raise ConfigError(f"--table: rows[{i}].ratio = {ratio:g} must be a fraction in (0, 1), e.g. 0.25")
        key = next((k for k in rows if abs(k - ratio) <= 1e-6), ratio)
        merged = rows.get(key, {k: None for k in ROW_KEYS})
        merged.update({k: (None if v is None else _number(v, f"rows[{i}].{k}")) for k, v in r.items()})
        merged["ratio"] = ratio
        rows[key] = merged
    prov = table.provenance + (f" Values from {p}: {data['source']}" if data.get("source") else f" Values from {p}.")
    return replace(table, base=base, rows=tuple(rows[k] for k in sorted(rows)), provenance=prov)


def _number(v: Any, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"--table: {where} = {v!r} is not a number") from None


# ------------------------------------------------------------------------------------------------ our runs
@dataclass
class PaperComparison:
    paper: PaperTable
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per run directory (see ``run_point``)
    skipped: list[str] = field(default_factory=list)  # runs left out, with the reason
    caveats: list[str] = field(default_factory=list)  # why the comparison is only relative


def run_point(run_dir: str | Path) -> dict[str, Any]:
    """What a run directory contributes: its prune ratio (the nearest prune stage of its lineage), top-1 right after
    that prune (``top1_pruned``), its own top-1 after fine-tuning (``top1``, ``None`` for a prune-only run), the
    baseline's top-1, MACs and parameters, and the ratios against the baseline.

    Raises:
        RunDirError: the run has no prune stage with a ``ratio`` in its lineage, or no reachable baseline.
    """
    d = Path(run_dir)
    metrics = runs.read_metrics(d)
    chain = lineage(d)
    ms = [read_json(c / runs.METRICS) or {} for c in chain]
    prune_i = next((i for i, m in enumerate(ms) if m.get("stage") == "prune" and m.get("ratio") is not None), None)
    if prune_i is None:
        raise RunDirError(f"{str(d)!r} descends from no prune stage with a ratio (metrics.json 'ratio'); only "
                          "one-shot prune runs and their fine-tuned descendants can be laid over a ratio table")
    base = ms[-1] if ms[-1].get("stage") == "train" else None
    if base is None:
        raise RunDirError(f"{str(d)!r}: no baseline (a stage: train run) is reachable through 'from'")
    pruned = ms[prune_i]
    tuned = prune_i > 0
    b1 = float(base["top1"])
    out = {"run": d.name, "dir": str(d), "ratio": float(pruned["ratio"]), "baseline_top1": b1,
           "top1_pruned": float(pruned["top1"]), "top1": float(metrics["top1"]) if tuned else None,
           "macs": int(metrics["macs"]), "params": int(metrics["params"]),
           "model": (read_json(d / runs.SPEC) or {}).get("name"), "dataset": base.get("dataset"),
           "criterion": pruned.get("criterion")}
    out["retention"] = out["top1_pruned"] / b1 if b1 else None
    out["recovery"] = out["top1"] / b1 if tuned and b1 else None
    out["macs_reduction"] = 1 - out["macs"] / base["macs"] if base.get("macs") else None
    out["params_reduction"] = 1 - out["params"] / base["params"] if base.get("params") else None
    return out


def paper_point(paper: PaperTable, row: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A paper row as the same relative figures: retention, recovery, MACs and params cut."""
    b = paper.base

    def rel(k: str) -> float | None:
        v = row.get(k) if row else None
        return None if v is None or not b.get("top1") else float(v) / b["top1"]

    def cut(k: str) -> float | None:
        v = row.get(k) if row else None
        return None if v is None or not b.get(k) else 1 - float(v) / b[k]

    return {"retention": rel("top1_pruned"), "recovery": rel("top1"), "macs_reduction": cut("macs"),
            "params_reduction": cut("params")}


def compare_with_paper(paper: str | PaperTable, run_dirs: Sequence[str | Path],
                       table_file: str | Path | None = None) -> PaperComparison:
    """Our runs against a paper table at equal prune ratios, as relative figures with deltas (ours - paper).

    Runs that cannot be placed on the ratio axis (no prune stage, no baseline) are skipped with the reason; if
    none is left, that is an error.
    """
    table = paper if isinstance(paper, PaperTable) else load_paper(paper, table_file)
    if not run_dirs:
        raise ConfigError("give at least one run directory to lay over the paper's table")
    cmp = PaperComparison(table)
    for d in run_dirs:
        if not Path(d).is_dir():
            raise RunDirError(f"run directory {str(d)!r} does not exist")
        try:
            ours = run_point(d)
        except RunDirError as e:
            cmp.skipped.append(str(e))
            continue
        theirs = paper_point(table, table.row(ours["ratio"]))
        row = {**ours, **{f"paper_{k}": v for k, v in theirs.items()}}
        for k in theirs:
            row[f"delta_{k}"] = None if ours[k] is None or theirs[k] is None else ours[k] - theirs[k]
        cmp.rows.append(row)
    if not cmp.rows:
        raise RunDirError("no run could be compared: " + "; ".join(cmp.skipped))
    cmp.rows.sort(key=lambda r: (r["ratio"], r["top1"] is not None))
    models = {r["model"] for r in cmp.rows}
    datasets = {r["dataset"] for r in cmp.rows}
    if not any("deit" in str(m).lower() for m in models) or not any("imagenet" in str(x).lower() for x in datasets):
        cmp.caveats.append(f"these runs use {', '.join(sorted(map(str, models)))} on "
                           f"{', '.join(sorted(map(str, datasets)))}, not {table.model} on {table.dataset}: only the "
                           "shape of the curves (retention and recovery relative to each baseline) is comparable")
    if not table.has_values:
        cmp.caveats.append("the paper's per-ratio values are not filled in (see the provenance); pass them with "
                           "--table FILE.json to get deltas")
    return cmp


# ------------------------------------------------------------------------------------------------ outputs
DELTA_COLUMNS = (("retention", "retention"), ("recovery", "after fine-tuning"), ("macs_reduction", "MACs cut"),
                 ("params_reduction", "params cut"))


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def delta_table(cmp: PaperComparison) -> tuple[list[str], list[list[str]]]:
    """(headers, cells): per run, ours / paper / delta (percent of the baseline, or percent cut) per figure."""
    headers = ["run", "ratio"]
    for _, label in DELTA_COLUMNS:
        headers += [f"{label} ours %", "paper %", "delta"]
    cells = []
    for r in cmp.rows:
        row = [r["run"], f"{r['ratio']:.4g}"]
        for k, _ in DELTA_COLUMNS:
            row += [_pct(r[k]), _pct(r[f"paper_{k}"]), _pct(r[f"delta_{k}"], signed=True)]
        cells.append(row)
    return headers, cells


def plot_comparison(cmp: PaperComparison, path: str | Path) -> Path:
    """Retention (before fine-tuning) and accuracy after fine-tuning, as % of each baseline's top-1, vs prune
    ratio: the paper's rows as lines (where given), our runs as markers."""
    from prunekit.report.plots import new_figure, save

    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    t = cmp.paper
    for key, col, label in (("top1_pruned", "#1f77b4", "paper: before fine-tuning"),
                            ("top1", "#d62728", "paper: after fine-tuning")):
        pts = [(0.0, 100.0)] + [(r["ratio"], 100 * r[key] / t.base["top1"]) for r in t.rows if r.get(key) is not None]
        if len(pts) > 1:
            ax.plot(*zip(*pts), color=col, lw=1.5, label=label)
    for key, col, label in (("retention", "#1f77b4", "ours: before fine-tuning"),
                            ("recovery", "#d62728", "ours: after fine-tuning")):
        pts = [(r["ratio"], 100 * r[key]) for r in cmp.rows if r[key] is not None]
        if pts:
            ax.scatter(*zip(*pts), color=col, marker="o" if key == "retention" else "s", s=40, zorder=3,
                       edgecolor="black", lw=0.5, label=label)
    ax.axhline(100, color="#888888", ls=":", lw=1)
    ax.set(xlabel="prune ratio (fraction of channels removed)", ylabel="top-1, % of the unpruned model's",
           title=f"{t.key}: retention and recovery vs prune ratio")
    if not t.has_values:
        ax.text(0.5, 0.04, "paper values not filled in (see provenance)", transform=ax.transAxes, ha="center",
                fontsize=8, color="#57606a")
    ax.set_xlim(0, max([0.55, *(r["ratio"] + 0.05 for r in cmp.rows)]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return save(fig, path)


def write_comparison(cmp: PaperComparison, out: str | Path) -> dict[str, Path]:
    """Write ``paper_comparison.{png,md,json}`` into the folder ``out``."""
    from prunekit._io import atomic_write_json, atomic_write_text
    from prunekit.report.table import markdown_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"png": plot_comparison(cmp, out / "paper_comparison.png"), "md": out / "paper_comparison.md",
             "json": out / "paper_comparison.json"}
    t = cmp.paper
    headers, cells = delta_table(cmp)
    md = [f"# Our runs against {t.key}", "", f"Source: {t.citation} ({t.url}).", "",
          f"Paper: {t.model} on {t.dataset}; baseline top-1 {t.base['top1']:g}%, {t.base['macs'] / 1e9:g} GMACs, "
          f"{t.base['params'] / 1e6:g} M params. Prune ratio: {t.ratio_meaning}.", "",
          f"Provenance: {t.provenance}", "",
          "Figures are relative to each side's own baseline: retention = top-1 right after pruning / baseline top-1; "
          "after fine-tuning = top-1 after fine-tuning / baseline top-1; cuts = 1 - pruned / baseline. "
          "Delta = ours - paper, in percentage points.", "", markdown_table(headers, cells), "",
          "![retention and recovery vs prune ratio](paper_comparison.png)", ""]
    md += [f"- Caveat: {c}" for c in cmp.caveats] + [f"- Skipped: {s}" for s in cmp.skipped]
    atomic_write_text(files["md"], "\n".join(md).rstrip() + "\n")
    atomic_write_json(files["json"], {"paper": {"key": t.key, "title": t.title, "citation": t.citation, "url": t.url,
                                                "model": t.model, "dataset": t.dataset, "base": t.base,
                                                "rows": list(t.rows), "provenance": t.provenance},
                                      "runs": cmp.rows, "caveats": cmp.caveats, "skipped": cmp.skipped})
    return files
