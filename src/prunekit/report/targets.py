"""Goals a pruned run must meet ("at least 40% of MACs cut with at most 1.5 points of top-1 lost") and the check.

Targets are written ``macs=0.4,drop=1.5`` on the command line and ``{"macs": 0.4, "drop": 1.5}`` in code:

=========  ===================  ==========================================
target     column               met when
=========  ===================  ==========================================
macs       ``macs_reduction``   the fraction of MACs cut is >= the value
params     ``params_reduction`` the fraction of parameters cut is >= it
latency    ``latency_reduction`` the fraction of latency cut is >= it
drop       ``top1_drop``        top-1 lost (points) against the baseline is <= it
top1       ``top1``             top-1 (%) is >= it
=========  ===================  ==========================================

A metric that is missing (no baseline, no latency measured) misses its target: "unknown" is never "met".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunekit.errors import ConfigError

DEFAULT_TARGETS: dict[str, float] = {"macs": 0.4, "drop": 1.5}
# target -> (row column, sense): the column must be >= or <= the target value
TARGETS: dict[str, tuple[str, str]] = {
    "macs": ("macs_reduction", ">="), "params": ("params_reduction", ">="), "latency": ("latency_reduction", ">="),
    "drop": ("top1_drop", "<="), "top1": ("top1", ">=")}
_FRACTIONS = ("macs", "params", "latency")


def parse_targets(text: str | Mapping[str, Any] | None) -> dict[str, float]:
    """``"macs=0.4,drop=1.5"`` (or a mapping) -> validated ``{"macs": 0.4, "drop": 1.5}``; ``None`` -> defaults.

    Example:
        >>> parse_targets("macs=0.5,drop=1")
        {'macs': 0.5, 'drop': 1.0}
    """
    if text is None:
        return dict(DEFAULT_TARGETS)
    if isinstance(text, Mapping):
        return check_targets(text)
    items: dict[str, str] = {}
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"--targets: {item!r} is not NAME=VALUE; e.g. --targets macs=0.4,drop=1.5 "
                              f"(names: {', '.join(TARGETS)})")
        k, v = item.split("=", 1)
        items[k.strip()] = v.strip()
    return check_targets(items)


def check_targets(targets: Mapping[str, Any]) -> dict[str, float]:
    """Validate ``{"macs": 0.4, "drop": 1.5}``-style targets (names in ``TARGETS``, numbers, fractions in [0, 1))."""
    out: dict[str, float] = {}
    for k, v in targets.items():
        if k not in TARGETS:
            raise ConfigError(f"--targets: unknown target {k!r}; valid: macs, params, latency (fraction cut, e.g. "
                              "0.4), drop (top-1 points), top1 (%)")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--targets {k}={v!r}: not a number") from None
        if out[k] != out[k]:
            raise ConfigError(f"--targets {k}={v!r}: not a number")
        if k in _FRACTIONS and not 0 <= out[k] < 1:
            raise ConfigError(f"--targets {k}={v}: a fraction cut must be in [0, 1), e.g. {k}=0.4 for 40%")
        if k == "drop" and out[k] < 0:
            raise ConfigError(f"--targets drop={v}: the allowed top-1 drop must be >= 0 points")
    return out


def describe_targets(targets: Mapping[str, float], score: str = "top-1") -> str:
    """``{"macs": 0.4, "drop": 1.5}`` -> ``"MACs cut >= 40%, top-1 drop <= 1.5 pts"``; ``score`` names what the
    ``drop`` / ``top1`` targets read (``"mAP50-95"`` for detection runs)."""
    words = {"macs": "MACs cut >= {:.0%}", "params": "params cut >= {:.0%}", "latency": "latency cut >= {:.0%}",
             "drop": score + " drop <= {:g} pts", "top1": score + " >= {:g}%"}
    return ", ".join(words[k].format(v) for k, v in targets.items()) or "none"


def missed_targets(row: Mapping[str, Any], targets: Mapping[str, float]) -> list[str]:
    """The targets ``row`` misses, in words (``"MACs cut 31.0% < 40%"``); a missing metric misses its target.

    Example:
        >>> missed_targets({"macs_reduction": 0.31, "top1_drop": 0.2}, {"macs": 0.4, "drop": 1.5})
        ['MACs cut 31.0% < 40%']
    """
    out = []
    for name, goal in targets.items():
        col, sense = TARGETS[name]
        v = row.get(col)
        label = {"macs": "MACs cut", "params": "params cut", "latency": "latency cut", "drop": "top-1 drop",
                 "top1": "top-1"}[name]
        if v is None:
            out.append(f"{label} unknown (not measured{' or no baseline' if name != 'top1' else ''})")
            continue
        ok = v >= goal if sense == ">=" else v <= goal
        if not ok:
            if name in _FRACTIONS:
                out.append(f"{label} {v:.1%} < {goal:.0%}")
            elif name == "drop":
                out.append(f"{label} {v:.2f} pts > {goal:g} pts")
            else:
                out.append(f"{label} {v:.2f}% < {goal:g}%")
    return out


def meets_targets(row: Mapping[str, Any], targets: Mapping[str, float]) -> bool:
    """True when ``row`` meets every target (see ``missed_targets``)."""
    return not missed_targets(row, targets)
