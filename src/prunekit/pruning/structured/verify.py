"""Check a selection on a shape-only (meta) copy before the real model is touched.

torch-pruning maps channels through most graphs, but a few layouts (e.g. a patch-merging reshape) come out with
mismatched shapes. Pruning a meta copy and running it shows that before anything irreversible happens; the groups
that break the forward pass are found one by one so the engine can leave them out (loudly) and prune the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from prunekit.measure import call_model
from prunekit.pruning.structured.criteria.base import to_device
from prunekit.pruning.structured.graph import PruningGraph, Unit, copy_graph, strip_batchnorm
from prunekit.pruning.structured.selection import Selection

log = logging.getLogger(__name__)

# model class -> the part of its output whose shapes pruning keeps (Ultralytics' detection models also return their
# head's input feature maps, pruned by design); registered by prunekit.pruning.structured.detect
OUTPUT_VIEWS: dict[type, Callable[[Any], Any]] = {}
# model class -> what the check runs in place of forward (a torchvision detector's postprocessing cannot run on the
# meta device: its raw head outputs); registered by prunekit.pruning.structured.tv_detect
CHECK_FORMS: dict[type, Callable[[Any, Any], Any]] = {}


def _call(model: Any, x: Any) -> Any:
    form = next((f for cls, f in CHECK_FORMS.items() if isinstance(model, cls)), None)
    return form(model, x) if form else call_model(model, x)


def _kept(model: Any, out: Any) -> list[tuple[int, ...]]:
    view = next((f for cls, f in OUTPUT_VIEWS.items() if isinstance(model, cls)), None)
    return output_shapes(view(out) if view else out)


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """Shapes of every tensor in a (nested) output."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        return [s for v in out.values() for s in output_shapes(v)]
    if isinstance(out, (tuple, list)):
        return [s for v in out for s in output_shapes(v)]
    return []


def _runs(graph: PruningGraph, units: list[Unit], sel: Selection, x: Any, expect: list, meta: bool = True) -> bool:
    from prunekit.pruning.structured.apply import apply_selection

    try:
        g = copy_graph(graph, meta=meta)
        apply_selection(g, units, sel)
        with torch.no_grad():
            model = strip_batchnorm(g.model) if meta else g.model
            return _kept(model, _call(model.eval(), x)) == expect
    except Exception as e:  # any failure of pruning or of the forward pass
        log.debug("meta check failed: %s: %s", type(e).__name__, e)
        return False


def broken_units(graph: PruningGraph, units: list[Unit], sel: Selection, example_inputs: Any) -> list[str]:
    """Units whose pruning (as in ``sel``) breaks the forward pass or changes the output shapes.

    Returns ``[]`` when the selection is fine, or when the model cannot run on the meta device (not checked).
    """
    x = to_device(example_inputs, "meta")
    try:
        with torch.no_grad():
            model = strip_batchnorm(copy_graph(graph, meta=True).model)
            expect = _kept(model, _call(model.eval(), x))
    except Exception as e:
        log.debug("cannot check the selection on the meta device (%s: %s)", type(e).__name__, e)
        return []
    if _runs(graph, units, sel, x, expect):
        return []
    bad = [u.name for u in units if u.name in sel.removed and not _runs(graph, [u], sel, x, expect)]
    if len(bad) == len(sel.removed) and _runs(graph, units, sel, example_inputs, expect, meta=False):
        log.debug("the selection fails on the meta device only; the real copy runs: nothing to leave out")
        return []
    return bad
