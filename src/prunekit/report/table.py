"""The summary table as text: headers and cell formats shared by the terminal, ``report.md`` and ``report.html``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunekit.report import detect as D
from prunekit.report.collect import ROW_KEYS

HEADERS: dict[str, str] = {
    "run": "run", "stage": "stage", "model": "model", "method": "method", "top1": "top-1 %", "top5": "top-5 %",
    "macs": "MACs", "params": "params", "latency_ms": "latency ms", "sparsity": "sparsity",
    "top1_drop": "top-1 drop", "macs_reduction": "MACs cut", "params_reduction": "params cut",
    "latency_reduction": "latency cut", "pareto": "Pareto", "goal": "goal met", **D.HEADERS}
# columns dropped from the table when no row has a value for them
_OPTIONAL = ("top5", "latency_ms", "sparsity", "latency_reduction", *D.ROW_KEYS)


def fmt_count(n: float | None) -> str:
    """``10130048`` -> ``"10.13 M"``."""
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def fmt_cell(key: str, v: Any) -> str:
    """One cell as text: accuracies with 2 decimals, counts with a unit, cuts as percentages."""
    if v is None:
        return "-"
    if key in ("top1", "top5", "map50", "map50_95"):
        return f"{v:.2f}"
    if key in ("macs", "params"):
        return fmt_count(v)
    if key == "latency_ms":
        return f"{v:.3f}"
    if key in ("top1_drop", "map_drop"):
        return f"{v:+.2f}"
    if key in ("sparsity", "macs_reduction", "params_reduction", "latency_reduction"):
        return f"{100 * v:.1f}%"
    if key == "pareto":
        return "yes" if v else ""
    return str(v)


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns worth showing: every row key, minus optional ones no row has."""
    top1 = any(r.get("top1") is not None for r in rows) or not rows  # none: only detection runs (mAP columns)
    return [k for k in ROW_KEYS if (k not in _OPTIONAL or any(r.get(k) is not None for r in rows))
            and (top1 or k not in ("top1", "top1_drop"))]


def text_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the summary table."""
    cols = columns(rows)
    return [HEADERS[c] for c in cols], [[fmt_cell(c, r.get(c)) for c in cols] for r in rows]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)
