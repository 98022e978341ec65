"""Draw the conv/linear layers of a model and its pruning groups as Graphviz ``dot`` text (and SVG/PNG with ``dot``).

Each prunable group is a coloured box holding the layers whose output channels it removes; dashed edges lead to
the layers whose input channels it removes. Layers that are never pruned (outputs, ignored, attention internals)
are grey.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from torch import nn

from prunekit.errors import ConfigError, PrunekitError
from prunekit.pruning.structured.graph import ROOT_TYPES, PruningGraph, Unit

PALETTE = ["#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd", "#d0e0e3", "#ead1dc"]


def _label(name: str, m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(str(v) for v in m.kernel_size)
        g = f" g{m.groups}" if m.groups > 1 else ""
        shape = f"{m.in_channels}->{m.out_channels} {k}{g}"
    else:
        shape = f"{m.in_features}->{m.out_features}"
    return f"{name}\\n{type(m).__name__} {shape}"


def layer_edges(graph: PruningGraph) -> list[tuple[str, str]]:
    """(producer, consumer) pairs of conv/linear layers, following the traced graph through other nodes."""
    edges = []
    for name in graph.layers:
        start = graph.DG.module2node[graph.modules[name]]
        seen, stack = {start}, list(start.outputs)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if isinstance(node.module, ROOT_TYPES):
                target = graph.name(node.module)
                if target is not None:
                    edges.append((name, target))
                continue
            stack.extend(node.outputs)
    return edges


def to_dot(graph: PruningGraph, units: list[Unit], title: str = "") -> str:
    """Graphviz text: layers as boxes, pruning groups as coloured clusters."""
    q = lambda s: '"' + s.replace('"', '\\"') + '"'  # noqa: E731
    lines = ["digraph prunekit {", "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica, fontsize=10];",
             f"  label={q(title)}; labelloc=t;" if title else ""]
    grouped: set[str] = set()
    for i, u in enumerate(units):
        color = PALETTE[i % len(PALETTE)]
        extra = f", {u.attention.num_heads} heads" if u.attention else ""
        lines.append(f"  subgraph cluster_{i} {{ label={q(f'group {u.name} ({u.channels} ch{extra})')}; "
                     f"style=filled; color={q(color)};")
        for n in u.layers:
            lines.append(f"    {q(n)} [label={q(_label(n, graph.modules[n]))}, fillcolor=white];")
            grouped.add(n)
        lines.append("  }")
    for n in graph.layers:
        if n not in grouped:
            grey = 'fillcolor="#eeeeee", fontcolor="#666666"'
            lines.append(f"  {q(n)} [label={q(_label(n, graph.modules[n]))}, {grey}];")
    consumer_of = {(u.name, c) for u in units for c in u.consumers}
    owner = {n: u.name for u in units for n in u.layers}
    for a, b in layer_edges(graph):
        dashed = (owner.get(a), b) in consumer_of
        lines.append(f"  {q(a)} -> {q(b)}{' [style=dashed]' if dashed else ''};")
    lines.append("}")
    return "\n".join(line for line in lines if line) + "\n"


def write_drawing(dot_text: str, out: str | Path) -> Path:
    """Write ``.dot`` text, or render ``.svg``/``.png``/``.pdf`` with the Graphviz ``dot`` binary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv", ""):
        out.write_text(dot_text)
        return out
    if fmt not in ("svg", "png", "pdf"):
        raise ConfigError(f"--out {str(out)!r}: unknown drawing format {fmt!r}; use .dot, .svg, .png or .pdf")
    exe = shutil.which("dot")
    if exe is None:
        raise ConfigError(f"--out {str(out)!r}: rendering .{fmt} needs Graphviz's 'dot' binary, which is not "
                          "installed; write a .dot file instead")
    res = subprocess.run([exe, f"-T{fmt}", "-o", str(out)], input=dot_text.encode(), capture_output=True,
                         timeout=300, check=False)
    if res.returncode != 0:
        raise PrunekitError(f"dot failed to render {out}: {res.stderr.decode(errors='replace')[:500]}")
    return out
