"""Detection runs in the report: mAP50 / mAP50-95 where a classification run has top-1.

A detection run's ``metrics.json`` (``prunekit.pipeline.detect``) holds ``map50`` and ``map50_95`` (fractions, COCO
AP on the test split) and no ``top1``. The report shows them as percent columns (``mAP50 %``, ``mAP50-95 %``) and the
mAP50-95 lost against the baseline (``mAP drop``, points); the run's *score* (``score``: top-1, else mAP50-95 in
percent) is what the Pareto front, the accuracy plot and the ``drop`` / ``top1`` targets read.

Example:
    >>> detection_row({"map50": 0.9, "map50_95": 0.6}, {"map50": 0.95, "map50_95": 0.7})
    {'map50': 90.0, 'map50_95': 60.0, 'map_drop': 10.0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROW_KEYS = ("map50", "map50_95", "map_drop")
HEADERS = {"map50": "mAP50 %", "map50_95": "mAP50-95 %", "map_drop": "mAP drop"}


def is_detection(metrics: Mapping[str, Any] | None) -> bool:
    """A detection run's metrics: numeric ``map50_95`` and no ``top1``."""
    return bool(metrics) and "top1" not in metrics and isinstance(metrics.get("map50_95"), (int, float))


def score_key(metrics: Mapping[str, Any]) -> str:
    """The metric a run must hold: ``map50_95`` for a detection run, else ``top1``."""
    return "map50_95" if is_detection(metrics) else "top1"


def detection_row(m: Mapping[str, Any], b: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mAP columns (percent) of a detection run's row; ``map_drop`` against baseline ``b`` when it has mAP."""
    if not is_detection(m):
        return {}
    row: dict[str, Any] = {"map50": 100 * float(m["map50"]) if isinstance(m.get("map50"), (int, float)) else None,
                           "map50_95": 100 * float(m["map50_95"])}
    if b is not None and is_detection(b):
        row["map_drop"] = 100 * (float(b["map50_95"]) - float(m["map50_95"]))
    return row


def score(row: Mapping[str, Any]) -> float:
    """A summary row's score: its top-1, else its mAP50-95 (percent)."""
    return row["top1"] if row.get("top1") is not None else row["map50_95"]


def target_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as the targets read it: for a detection row, ``drop`` is the mAP50-95 drop and ``top1`` the mAP50-95."""
    if row.get("top1") is not None or row.get("map50_95") is None:
        return dict(row)
    return {**row, "top1": row["map50_95"], "top1_drop": row.get("map_drop")}


def missed_words(words: list[str], row: Mapping[str, Any]) -> list[str]:
    """``missed_targets``' words for a detection row say mAP50-95 where they say top-1."""
    if row.get("top1") is not None or row.get("map50_95") is None:
        return words
    return [w.replace("top-1", "mAP50-95") for w in words]


def score_label(rows: Sequence[Mapping[str, Any]]) -> str:
    """The y-axis label of the accuracy plot: top-1, mAP50-95, or both when the runs mix."""
    det = [r.get("top1") is None and r.get("map50_95") is not None for r in rows]
    return "mAP50-95 (%)" if all(det) else ("top-1 (%)" if not any(det) else "top-1 / mAP50-95 (%)")


def score_name(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the runs are scored by, in words: ``top-1``, ``mAP50-95``, or ``top-1 / mAP50-95`` when they mix."""
    return score_label(rows).removesuffix(" (%)")


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary's score columns, as the table names them (markdown)."""
    det = [r.get("top1") is None and r.get("map50_95") is not None for r in rows]
    cols = ([] if rows and all(det) else ["`top1` / `top5`"]) + (["`mAP50` / `mAP50-95`"] if any(det) else [])
    return " and ".join(cols)


def summary_note(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The summary's sentence about the mAP columns, when a row has them."""
    if not any(r.get("map50_95") is not None for r in rows):
        return None
    return ("`mAP50` / `mAP50-95` are COCO's box AP (101-point, IoU 0.5 and 0.50:0.05:0.95, in percent) on the "
            "detection set's test split, over the detections after NMS (confidence 0.001, IoU 0.7); its val split "
            "only picked epochs. `mAP drop` is the mAP50-95 lost against the baseline, in points; for detection runs "
            "the Pareto front and the `drop` target read mAP50-95.")


def history_score(h: Mapping[str, Any]) -> float | None:
    """A history line's validation score: top-1, else val mAP50-95 in percent (detection)."""
    if isinstance(h.get("top1"), (int, float)):
        return h["top1"]
    v = h.get("val_map50_95")
    return 100 * v if isinstance(v, (int, float)) and v == v else None
