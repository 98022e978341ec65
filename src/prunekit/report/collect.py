"""Read run directories into report rows: metrics, the baseline each run descends from, reductions, goals.

Only the files of the run-directory contract are read (``metrics.json``, ``model.json``, ``model.safetensors``,
``history.jsonl``, and ``profile.json`` / ``graph.svg`` / ``sensitivity.json`` where a run has them), never
``log.txt``. The baseline of a run is found by following the ``from`` key of each ``metrics.json`` back to the
nearest run with ``stage: "train"``.

Example:
    >>> rows = collect_runs(["runs/base", "runs/pruned", "runs/finetuned"], targets={"macs": 0.4, "drop": 1.5})
    >>> [(r.label, r.row["top1"], r.row.get("macs_reduction"), r.goal) for r in rows]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit import runs
from prunekit.errors import ConfigError, RunDirError
from prunekit.report import detect as D
from prunekit.report.pareto import pareto_front
from prunekit.report.targets import DEFAULT_TARGETS, check_targets, missed_targets

log = logging.getLogger(__name__)

PROFILE = "profile.json"
GRAPHS = ("graph.svg", "graph.png")
SENSITIVITY = "sensitivity.json"
# where a run directory may keep a sensitivity result: beside its files, or where `prunekit sensitivity` writes it
SENSITIVITY_PLACES = (SENSITIVITY, f"sensitivity/{SENSITIVITY}")
_LATENCY_BACKENDS = ("eager", "onnxruntime", "compile", "cuda")
_TRAINED = ("train", "finetune", "sparse", "pat")  # stages that keep a best epoch


@dataclass
class RunRecord:
    """One run directory as the report sees it.

    Attributes:
        dir: the run directory.
        label: a short unique name for tables and legends.
        metrics: its ``metrics.json``.
        spec: its ``model.json`` (as a dict).
        lineage: this run, then each ancestor reached through ``from``, ending at the baseline when reachable.
        baseline_dir: the nearest ``stage: train`` run among ``lineage`` (the run itself for a train run).
        baseline: the baseline's metrics.
        row: the summary-table row (see ``ROW_KEYS``).
        missed: the targets this run misses, in words (empty when it meets them or is a baseline).
        profile: ``profile.json`` when present; graph: ``graph.svg``/``graph.png`` when present.
        history: ``history.jsonl`` rows.
        is_baseline: a ``stage: train`` run (reductions are zero by definition; no goal applies).
        added: a baseline the report added because a listed run descends from it.
    """

    dir: Path
    label: str
    metrics: dict[str, Any]
    spec: dict[str, Any]
    lineage: list[Path]
    baseline_dir: Path | None
    baseline: dict[str, Any] | None
    row: dict[str, Any] = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    graph: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    is_baseline: bool = False
    added: bool = False
    scan: Any = None  # prunekit.report.weights.WeightScan (per-layer sparsity, |w| sample) when weights were read

    @property
    def goal(self) -> str:
        """``"baseline"``, ``"yes"`` or ``"no"``."""
        return "baseline" if self.is_baseline else ("no" if self.missed else "yes")


# every column the summary table may have, in order; `report.md`, `report.html` and the CLI share them
ROW_KEYS = ("run", "stage", "model", "method", "top1", "top5", *D.ROW_KEYS[:2], "macs", "params", "latency_ms",
            "sparsity", "top1_drop", D.ROW_KEYS[2], "macs_reduction", "params_reduction", "latency_reduction", "pareto",
            "goal")  # a detection run has mAP50 / mAP50-95 / mAP drop (prunekit.report.detect) instead of top-1


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, ``None`` when absent; a corrupt file is a ``RunDirError`` naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is corrupt: {e}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def resolve_from(value: str | Path, child: Path) -> Path | None:
    """The run directory a ``from`` key names: as written (absolute, or relative to the working directory, as the
    stage that wrote it saw it), else relative to the child run's parent folder. ``None`` when none exists."""
    p = Path(value)
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, child.parent / p, child.parent / p.name]
    for c in candidates:
        if (c / runs.METRICS).is_file():
            return c.resolve()
    return None


def lineage(run_dir: str | Path, max_depth: int = 100) -> list[Path]:
    """``run_dir`` then each ancestor through ``from`` up to (and including) the first ``stage: train`` run, or as far
    as the chain can be followed (a missing ancestor ends it with a warning)."""
    cur = Path(run_dir).resolve()
    chain: list[Path] = []
    while len(chain) < max_depth and cur not in chain:
        chain.append(cur)
        m = read_json(cur / runs.METRICS) or {}
        if m.get("stage") == "train" or not m.get("from"):
            break
        nxt = resolve_from(m["from"], cur)
        if nxt is None:
            log.warning("report: %s descends from %s, which cannot be found; its reductions are left blank",
                        cur, m["from"])
            break
        cur = nxt
    return chain


def _latency(metrics: Mapping[str, Any]) -> float | None:
    """Median latency (ms) a run measured: ``latency_ms``, or the first backend of a ``latency`` table."""
    if isinstance(metrics.get("latency_ms"), (int, float)):
        return float(metrics["latency_ms"])
    table = metrics.get("latency")
    if isinstance(table, Mapping):
        for b in (*_LATENCY_BACKENDS, *table):
            s = table.get(b)
            if isinstance(s, Mapping) and isinstance(s.get("median_ms"), (int, float)):
                return float(s["median_ms"])
    return None


def _method(chain: Sequence[Path]) -> str:
    """How the run was pruned, from the nearest prune-like stage of its lineage (``"l1 global r=0.40"``)."""
    for d in chain:
        m = read_json(d / runs.METRICS) or {}
        if m.get("criterion"):
            comp = m.get("compensate", _config_value(d, "compensate"))
            how = f"{m['criterion']}{'+' + comp if comp not in (None, 'none') else ''} {m.get('scope', '')}".strip()
            if m.get("target_macs") is not None:
                how += f" macs={m['target_macs']:g}"
            elif m.get("ratio") is not None:
                how += f" r={m['ratio']:.2f}"
            return how
        if m.get("stage") == "pat":
            return "pat"
        if m.get("stage") == "sparsify" and m.get("method"):  # unstructured, N:M, kernel
            how = m["method"]
            if how == "nm":
                how += f" {_config_value(d, 'nm') or ''}".rstrip()
            elif isinstance(m.get("target_sparsity"), (int, float)):
                how += f" s={m['target_sparsity']:.2f}"
            return how + (f" {m['schedule']}" if m.get("schedule") not in (None, "oneshot") else "")
    return "-"


def _config_value(run_dir: Path, key: str) -> Any:
    """A setting from the run's ``config.yaml`` (runs written before metrics.json carried it), or None."""
    try:
        cfg = runs.read_config(run_dir)
    except (OSError, yaml.YAMLError):  # an unreadable config only costs the label its detail
        return None
    return cfg.get(key) if isinstance(cfg, dict) else None


def _labels(dirs: Sequence[Path]) -> list[str]:
    """Short unique names: the folder name, with parent folders added until the names differ."""
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


def _read_run(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not d.is_dir():
        raise RunDirError(f"run directory {str(d)!r} does not exist")
    metrics = runs.read_metrics(d)
    spec = read_json(d / runs.SPEC)
    if spec is None:
        raise RunDirError(f"{str(d)!r} is not a run directory: it has no {runs.SPEC}")
    for key in (D.score_key(metrics), "macs", "params"):
        if not isinstance(metrics.get(key), (int, float)):
            raise RunDirError(f"{d / runs.METRICS} has no numeric {key!r}; is this a finished run directory?")
    return metrics, spec


def collect_runs(run_dirs: Sequence[str | Path], targets: Mapping[str, Any] | None = None,
                 add_baselines: bool = True, sparsity: bool = True) -> list[RunRecord]:
    """One ``RunRecord`` per run directory (plus, with ``add_baselines``, the baselines they descend from that were
    not listed, first), with the summary row, goals and the top-1 vs MACs Pareto flag filled in.

    Args:
        run_dirs: run directories, in the order wanted in the table.
        targets: goals (see ``prunekit.report.targets``); ``None`` -> at least 40% MACs cut, at most 1.5 pts drop.
        add_baselines: also list each baseline a run descends from.
        sparsity: read every weight (per-layer zero fractions, a sample of magnitudes: ``RunRecord.scan``) for the
            ``sparsity`` column and the weight plots.

    Raises:
        ConfigError: no run directory given, or one listed twice.
        RunDirError: a directory is missing, is not a run directory, or holds a corrupt file.
    """
    from prunekit.report.weights import scan_weights

    if not run_dirs:
        raise ConfigError("give at least one run directory")
    targets = check_targets(DEFAULT_TARGETS if targets is None else targets)
    dirs = [Path(d).resolve() for d in run_dirs]
    dup = [str(d) for i, d in enumerate(dirs) if d in dirs[:i]]
    if dup:
        raise ConfigError(f"run directory {dup[0]!r} is listed twice")
    loaded = {d: _read_run(d) for d in dirs}
    chains = {d: lineage(d) for d in dirs}
    bases: dict[Path, Path | None] = {}
    for d, chain in chains.items():
        last = chain[-1]
        bases[d] = last if (read_json(last / runs.METRICS) or {}).get("stage") == "train" else None
    extra = [] if not add_baselines else list(dict.fromkeys(b for b in bases.values() if b and b not in dirs))
    for b in extra:
        loaded[b] = _read_run(b)
        chains[b], bases[b] = [b], b
    order = extra + dirs
    records = []
    for d, label in zip(order, _labels(order)):
        metrics, spec = loaded[d]
        base_dir = bases[d]
        base = (loaded[base_dir][0] if base_dir in loaded else runs.read_metrics(base_dir)) if base_dir else None
        rec = RunRecord(dir=d, label=label, metrics=metrics, spec=spec, lineage=chains[d], baseline_dir=base_dir,
                        baseline=base, is_baseline=metrics.get("stage") == "train", added=d in extra)
        rec.profile = read_json(d / PROFILE)
        rec.graph = next((d / g for g in GRAPHS if (d / g).is_file()), None)
        try:
            rec.history = runs.read_history(d)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{d / runs.HISTORY} is corrupt: {e}") from None
        if sparsity:
            rec.scan = scan_weights(d)
        rec.row = _row(rec, rec.scan.overall_sparsity if rec.scan is not None else None)
        rec.missed = [] if rec.is_baseline else D.missed_words(missed_targets(D.target_view(rec.row), targets), rec.row)
        rec.row["goal"] = rec.goal
        records.append(rec)
    front = pareto_front([(r.row["macs"], D.score(r.row)) for r in records])
    for i, r in enumerate(records):
        r.row["pareto"] = i in front
    return records


def _row(rec: RunRecord, sparsity: float | None) -> dict[str, Any]:
    m, b = rec.metrics, rec.baseline
    row: dict[str, Any] = {"run": rec.label, "stage": m.get("stage", "?"), "model": rec.spec.get("name", "?"),
                           "method": _method(rec.lineage),
                           "top1": float(m["top1"]) if isinstance(m.get("top1"), (int, float)) else None,
                           "top5": float(m["top5"]) if isinstance(m.get("top5"), (int, float)) else None,
                           "macs": int(m["macs"]), "params": int(m["params"]), "latency_ms": _latency(m),
                           "sparsity": sparsity, **D.detection_row(m, b)}
    if b is not None:
        if row["top1"] is not None and isinstance(b.get("top1"), (int, float)):
            row["top1_drop"] = float(b["top1"]) - row["top1"]
        row["macs_reduction"] = 1 - row["macs"] / b["macs"] if b.get("macs") else None
        row["params_reduction"] = 1 - row["params"] / b["params"] if b.get("params") else None
        base_lat = _latency(b)
        row["latency_reduction"] = (1 - row["latency_ms"] / base_lat
                                    if row["latency_ms"] is not None and base_lat else None)
    prof_lat = profile_latency_reduction(rec.profile)
    if prof_lat:  # timed alternately against its baseline: more trustworthy than two separate timings
        row["latency_reduction"] = next(iter(prof_lat.values()))
    return {k: row.get(k) for k in ROW_KEYS if k not in ("pareto", "goal")}


def split_notes(records: Sequence[RunRecord]) -> list[str]:
    """Sentences for the summary about the split behind each top-1: trained runs whose ``metrics.json`` does not mark
    its top-1 as a test figure (no ``test_loss``: an older prunekit picked their epochs on the split it reported), and
    fine-tunes that kept their start model or ended below it on test."""
    notes = []
    unmarked = [r for r in records if "test_loss" not in r.metrics and not _detection_test(r.metrics)
                and ("best_epoch" in r.metrics or r.metrics.get("stage") in _TRAINED)]
    if unmarked:
        notes.append(f"The {D.score_name([r.row for r in unmarked])} of {', '.join(r.label for r in unmarked)} is not "
                     "marked as a test-split figure (their metrics.json has no `test_loss`: written before prunekit "
                     "had a validation split, their best epoch was picked on the split they report); it may be "
                     "optimistic.")
    kept = [r.label for r in records if r.metrics.get("kept_start")]
    if kept:
        notes.append(f"No fine-tuning epoch beat the start model on val for {', '.join(kept)}: the start was kept.")
    below = [f"{r.label} ({r.metrics['top1']:.2f} < {r.metrics['start_top1']:.2f})" for r in records
             if r.metrics.get("below_start") and isinstance(r.metrics.get("start_top1"), (int, float))]
    if below:
        notes.append(f"Fine-tuned below their start on test: {', '.join(below)}.")
    return notes


def _detection_test(metrics: Mapping[str, Any]) -> bool:
    """A detection run's mAP measured on the test split (``prunekit.pipeline.detect`` records ``test_samples``)."""
    return D.is_detection(metrics) and isinstance(metrics.get("test_samples"), int)


def profile_latency_reduction(profile: Mapping[str, Any] | None) -> dict[str, float]:
    """``{backend: latency_reduction}`` of a ``profile.json`` (backends that failed are left out)."""
    if not profile:
        return {}
    lat = profile.get("latency_reduction")
    if not isinstance(lat, Mapping):
        return {}
    return {b: float(v) for b, v in lat.items() if isinstance(v, (int, float))}


def find_sensitivity(records: Sequence[RunRecord]) -> Path | None:
    """The first ``sensitivity.json`` kept in (or under ``sensitivity/`` of) a listed run or one of its ancestors."""
    for r in records:
        for d in r.lineage:
            for place in SENSITIVITY_PLACES:
                if (d / place).is_file():
                    return d / place
    return None
