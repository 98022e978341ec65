"""Layer names matched by regexes (``--only``, ``--ignore``, per-layer overrides): a pattern matches a module or any
of its parents (``layer1`` covers ``layer1.0.conv1``); a pattern matching nothing is an error naming near names."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prunekit.errors import ConfigError, closest, compile_patterns


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def matches(name: str, pattern: re.Pattern) -> bool:
    """``pattern`` fully matches the module name or the name of one of its parents (``layer1`` covers
    ``layer1.0.conv1``)."""
    return any(pattern.fullmatch(a) for a in _ancestors(name))


def match_layers(names: Iterable[str], patterns: Iterable[str], option: str, all_names: Iterable[str]) -> set[str]:
    """Names matched by any of ``patterns``; a pattern that matches no module at all is a ``ConfigError``."""
    names, all_names = list(names), list(all_names)
    hit: set[str] = set()
    for pat in compile_patterns(patterns, option):
        mine = {n for n in names if matches(n, pat)}
        if not mine and not any(matches(n, pat) for n in all_names if n):
            raise ConfigError(no_match_message(option, pat.pattern, all_names))
        hit |= mine
    return hit


def no_match_message(option: str, pattern: str, names: list[str]) -> str:
    searched = [n for n in names if n and re.search(pattern, n)] if _valid(pattern) else []
    near = searched[:5] or closest(pattern, [n for n in names if n], n=5)
    hint = f"; near candidates: {', '.join(near)}" if near else ""
    return (f"{option}: regex {pattern!r} matches no module name (it must match a whole name, e.g. "
            f"'layer1\\..*' or 'layer1'){hint}")


def _valid(p: str) -> bool:
    try:
        re.compile(p)
        return True
    except re.error:
        return False


def first_override(name: str, overrides: dict[str, float], compiled: dict[str, re.Pattern]) -> float | None:
    for key, value in overrides.items():
        if matches(name, compiled[key]):
            return value
    return None
