"""Pareto front of (cost, value) points: lower cost and higher value are better (e.g. MACs vs top-1).

Example:
    >>> pareto_front([(10.0, 90.0), (5.0, 85.0), (6.0, 80.0), (12.0, 89.0)])
    [1, 0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from prunekit.errors import ConfigError


def pareto_front(points: Sequence[tuple[float, float]], maximize: bool = True) -> list[int]:
    """Indices of the non-dominated ``(cost, value)`` points, ordered by increasing cost.

    A point is dominated when another has a cost no higher and a value no worse, one of them strictly better.
    Exact duplicates of a front point are all kept (they dominate nothing and nothing dominates them).

    Args:
        points: ``(cost, value)`` pairs, e.g. ``(macs, top1)``.
        maximize: ``True`` when a higher value is better (accuracy), ``False`` when lower is (loss, drop).

    Returns:
        Indices into ``points`` of the front, cheapest first.

    Raises:
        ConfigError: a cost or value is NaN or not a number (a front over NaN would be meaningless).
    """
    pts = []
    for i, p in enumerate(points):
        try:
            c, v = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            raise ConfigError(f"pareto_front: point {i} = {p!r} is not a (cost, value) pair of numbers") from None
        if math.isnan(c) or math.isnan(v):
            raise ConfigError(f"pareto_front: point {i} = {p!r} has a NaN; drop unmeasured points first")
        pts.append((c, v if maximize else -v))
    # by cost, best value first among equal costs: a point is on the front iff its value beats every cheaper one
    order = sorted(range(len(pts)), key=lambda i: (pts[i][0], -pts[i][1]))
    front: list[int] = []
    for i in order:
        if not front or pts[i][1] > pts[front[-1]][1] or pts[i] == pts[front[-1]]:
            front.append(i)
    return front
