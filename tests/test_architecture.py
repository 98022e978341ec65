"""The shape of the house (docs: ARCHITECTURE.md): imports point down the layer order, no cycle between the
top-level packages, no source file over 400 lines, no function over 60.

Every ``import`` / ``from ... import`` in ``src/prunekit`` is read with ``ast.walk``: module level, inside functions
and under ``TYPE_CHECKING`` alike, relative imports resolved. The size checks keep an explicit allowlist of today's
offenders with their current length: a new offender or a longer one fails; an entry no longer needed is a warning
(delete it), so the lists only shrink.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "prunekit"

# The layer order, top first. A module may import from its own layer and from the layers below it, never above.
# "room" = the first name under prunekit (a sub-package or a single module). Two rooms of one layer may import each
# other in one direction only (a cycle fails). Where this differs from ARCHITECTURE.md, on purpose:
# - runs.py sits ABOVE models/ and data/ (the notes put it below): the run-directory contract rebuilds a saved model
#   by name (``load_model`` -> ``create_model``), so it needs the model registry; the model registry only needs the
#   spec record, which belongs with the models (see KNOWN_UPWARD).
# - measure/ above export/ as in the notes: latency is measured on the exported ONNX model; export needs only the
#   batch helpers (``call_model``, ``batch_size_of``), which live on the ground floor (prunekit/batch.py).
# - quantize/ does not exist yet; its place is kept.
LAYERS: list[tuple[str, ...]] = [
    ("__main__", "cli"),
    ("pipeline",),
    ("report",),
    ("train",),
    ("pruning",),
    ("quantize",),
    ("measure",),
    ("export",),
    ("runs", "runs_model", "runs_spec"),  # the run-directory contract
    ("models", "data"),
    ("config", "registry", "batch", "distributed", "errors", "_io"),  # the ground floor, used by everyone
]
FACADE = "prunekit"  # the lazy public API (src/prunekit/__init__.py): it imports everything, nothing imports it...
FACADE_NAMES = {"__version__"}  # ...except for these names

# Upward imports that exist today and are not fixed yet: (importing module, imported module) -> what to do.
# An entry that no longer matches an import is reported as a warning: delete it when its import is gone.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Today's offenders, "path under src/prunekit" -> lines. Shrink only.
LONG_FILES: dict[str, int] = {
}
# "path::qualified name" -> lines (def line to last line, decorators excluded). Shrink only.
LONG_FUNCTIONS: dict[str, int] = {
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. prunekit.pruning.structured.engine
    target: str  # imported module (a submodule when ``from pkg import submodule``)
    names: tuple[str, ...]  # names taken by ``from target import ...`` (empty for ``import target``)
    where: str  # file:line


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    where = str(path.relative_to(SRC.parent))
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges += [Edge(name, a.name, (), f"{where}:{node.lineno}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = tuple(a.name for a in node.names)
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            plain = tuple(n for n in names if f"{target}.{n}" not in modules)
            edges += [Edge(name, s, (), f"{where}:{node.lineno}") for s in subs]
            if plain:
                edges.append(Edge(name, target, plain, f"{where}:{node.lineno}"))
    return [e for e in edges if e.target == FACADE or e.target.startswith(FACADE + ".")]


def import_edges() -> list[Edge]:
    """Every import of a prunekit module by a prunekit module (the facade's own imports left out)."""
    modules = _modules()
    return [e for name, path in modules.items() if name != FACADE for e in _imports_of(name, path, modules)]


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


LAYER_OF = {r: i for i, layer in enumerate(LAYERS) for r in layer}


def test_every_room_has_a_layer() -> None:
    rooms = {room(m) for m in _modules() if m != FACADE}
    missing = sorted(rooms - set(LAYER_OF))
    assert not missing, f"new top-level package(s) {missing}: give each a place in LAYERS (and ARCHITECTURE.md)"


def test_imports_point_down() -> None:
    bad, used = [], set()
    for e in import_edges():
        if e.target == FACADE:
            if not set(e.names) <= FACADE_NAMES:
                bad.append(f"{e.where}: {e.source} imports {sorted(set(e.names) - FACADE_NAMES)} from the public "
                           "facade 'prunekit'; import them from the module that defines them")
            continue
        src, dst = room(e.source), room(e.target)
        if src == dst or LAYER_OF.get(dst, 0) >= LAYER_OF.get(src, 0):
            continue
        if (e.source, e.target) in KNOWN_UPWARD:
            used.add((e.source, e.target))
            continue
        bad.append(f"{e.where}: {e.source} ({src}) imports {e.target} ({dst}), a layer above it")
    stale = sorted(set(KNOWN_UPWARD) - used)
    if stale:  # a warning, not a failure: the fix and the list may land in different commits
        warnings.warn(f"KNOWN_UPWARD entries no longer needed, delete them: {stale}", stacklevel=1)
    assert not bad, "imports pointing up the layer order:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_between_rooms() -> None:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for e in import_edges():
        src, dst = room(e.source), room(e.target)
        if e.target == FACADE or src == dst or (e.source, e.target) in KNOWN_UPWARD:
            continue
        graph.setdefault(src, set()).add(dst)
        where.setdefault((src, dst), []).append(e.where)
    cycles = _cycles(graph)
    shown = [f"{c}: " + "; ".join(f"{a}->{b} at {where[a, b][0]}" for a in c for b in c if (a, b) in where)
             for c in cycles]
    assert not cycles, "import cycles between top-level packages:\n" + "\n".join(shown)


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """(file -> lines, "file::function" -> lines) of every source file and function over the limits."""
    files, funcs = {}, {}
    for path in sorted(PKG.rglob("*.py")):
        rel, text = path.relative_to(PKG).as_posix(), path.read_text()
        if (n := len(text.splitlines())) > MAX_FILE_LINES:
            files[rel] = n
        for qualname, n in _functions(ast.parse(text)):
            if n > MAX_FUNCTION_LINES:
                funcs[f"{rel}::{qualname}"] = n
    return files, funcs


def _ratchet(found: dict[str, int], allowed: dict[str, int], limit: int, what: str) -> list[str]:
    """The offenders that are new or grew; entries no longer needed are warned about (delete them)."""
    stale = [k for k in sorted(allowed) if k not in found]
    if stale:
        warnings.warn(f"{what}: now within the limit or gone, delete from the allowlist: {stale}", stacklevel=1)
    return [f"{k}: {n} lines (limit {limit}{f', allowlisted at {allowed[k]}' if k in allowed else ''})"
            for k, n in sorted(found.items()) if n > allowed.get(k, limit)]


@pytest.mark.parametrize("kind", ["files", "functions"])
def test_sizes(kind: str) -> None:
    files, funcs = sizes()
    if kind == "files":
        errors = _ratchet(files, LONG_FILES, MAX_FILE_LINES, "LONG_FILES")
    else:
        errors = _ratchet(funcs, LONG_FUNCTIONS, MAX_FUNCTION_LINES, "LONG_FUNCTIONS")
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------- the checker checks itself
def test_reader_sees_function_level_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "prunekit"
    (pkg / "pruning").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "pruning" / "__init__.py").write_text("")
    (pkg / "pruning" / "core.py").write_text(
        "from .. import errors\n"
        "def f():\n    from ..pipeline import sweep\n"
        "    if True:\n        import prunekit.report.x\n"
        "from prunekit import prune\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    monkeypatch.setitem(globals(), "PKG", pkg)
    got = {(e.target, e.names) for e in import_edges()}
    assert got == {("prunekit.errors", ()), ("prunekit.pipeline", ("sweep",)), ("prunekit.report.x", ()),
                   ("prunekit", ("prune",))}


def test_cycle_finder() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
