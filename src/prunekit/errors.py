"""One small hierarchy of typed errors. Only ``prunekit.cli`` turns them into a message and an exit code."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class PrunekitError(Exception):
    """Base of every error prunekit raises on purpose (a user mistake or a refused operation)."""


class ConfigError(PrunekitError, ValueError):
    """A configuration value, flag or YAML key is wrong."""


class RunDirError(PrunekitError):
    """A run directory (or a weights file in it) is missing, incomplete or corrupt."""


class DataNotFoundError(PrunekitError):
    """A dataset's files are not where we looked and cannot be downloaded."""


class PruningError(PrunekitError):
    """A pruning step cannot be done as asked (it would silently do nothing, empty a layer, ...)."""


class ExportError(PrunekitError):
    """An export failed, or its numeric verification did."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``choices`` that look like ``name`` (for "did you mean ...?")."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """"unknown model 'resnt20'; did you mean 'resnet20'? Valid model names: ..."."""
    choices = sorted(choices)
    near = closest(name, choices)
    hint = f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
    return f"unknown {kind} {name!r}{hint} Valid {kind} names: {', '.join(choices)}"


def compile_patterns(patterns: Iterable[str], option: str) -> list[re.Pattern]:
    """Compile user regexes; a bad one is a ``ConfigError`` naming ``option`` and the pattern."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{option}: {p!r} is not a valid regular expression: {e}") from None
    return out
