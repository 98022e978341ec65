"""Ultralytics YOLO (v8, 11) pruned end to end: what the engine needs beyond the prunable forms.

torch-pruning 1.6 cannot follow a channel index through a conv whose output is ``split``/``chunk``-ed and whose halves
are both used (C2f, C3k2, C2PSA, PSA): those groups came out "inconsistent" and stayed whole, or (C2PSA, whose split
sizes are fixed numbers) the pruned model failed its forward. ``make_yolo_prunable(model)``, run by the engine on every
model built with Ultralytics:

- rewrites the blocks into equal forms without the split (``prunekit.models.yolo_prunable``: ``cv1`` -> ``cv1a`` +
  ``cv1b``; the PSA ``Attention``'s ``qkv`` -> one conv per head and role, ``q.h`` / ``k.h`` / ``v.h``);
- registers ``KeyDotPruner`` for the attention's per-head ``KeyDot`` (softmax of the query-key products, no
  weights): traced through the attention's ``channel_trace``, a head's key dims (``q.h`` with ``k.h``) are one group
  and its value dims (``v.h``, their ``pe`` channels, ``proj``'s inputs) another, so the attention is pruned per head
  like every other block (the stream through it too);
- traces Detect-family heads (Detect, Segment, Pose, OBB) through ``head_trace``: every level's branch output (box,
  DFL, class, mask-coefficient, keypoint channels) and a Segment head's prototypes are model outputs, so those layers
  keep their size and everything before them is pruned; ``dfl`` (fixed weights) is not traced;
- tells the shape check (``verify.OUTPUT_VIEWS``) that the head's input feature maps, which a YOLO model also
  returns (``"feats"``), are pruned by design.

Nothing here imports ``ultralytics`` unless the model was built with it (it is then in ``sys.modules``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn

log = logging.getLogger(__name__)


class KeyDotPruner(tp.pruner.function.BasePruningFunc):
    """A PSA head's ``KeyDot`` (``prunekit.models.yolo_prunable``): no weights; its input channels are the head's key
    dims (its q and k convs lose them), its output channels the attention's output width (trace only)."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.width -= len(idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        layer.keys -= len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.width

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.keys


_BRANCHES = ("cv2", "cv3", "cv4", "cv5", "one2one_cv2", "one2one_cv3", "one2one_cv4")


def head_trace(self: Any, x: list[Tensor]) -> list[Tensor]:
    """What torch-pruning traces of a Detect-family head: every level's branch output is a model output (its channels
    stay), a Segment head's ``proto`` too; the decoding (views to box/DFL/class channels, ``dfl``) is left out."""
    outs = []
    for name in _BRANCHES:
        branch = getattr(self, name, None)
        if isinstance(branch, nn.ModuleList):
            outs += [branch[i](x[i]) for i in range(min(len(branch), len(x)))]
    proto = getattr(self, "proto", None)
    if isinstance(proto, nn.Module):
        outs.append(proto(x[0]))
    return outs


def without_features(out: Any) -> Any:
    """A YOLO model's output without the head's input feature maps (``"feats"``: pruned by design)."""
    if isinstance(out, dict):
        return {k: without_features(v) for k, v in out.items() if k != "feats"}
    if isinstance(out, (tuple, list)):
        return [without_features(v) for v in out]
    return out


def _head_types() -> tuple[type, ...]:
    from ultralytics.nn.modules import head

    return tuple(c for c in (getattr(head, "Detect", None),) if c is not None)


def make_yolo_prunable(model: nn.Module) -> int:
    """Rewrite the Ultralytics blocks of ``model`` in place into their prunable forms and register the head trace,
    the key-dim pruner and the output view (see the module docstring); returns how many modules were rewritten.
    A model built without Ultralytics (it is not imported) is left alone and 0 is returned."""
    if "ultralytics.nn.modules" not in sys.modules:
        return 0
    from ultralytics.nn.tasks import BaseModel

    from prunekit.models.yolo_prunable import KeyDot, rewrite_yolo
    from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS, TRACE_FORMS
    from prunekit.pruning.structured.verify import OUTPUT_VIEWS

    OUTPUT_VIEWS.setdefault(BaseModel, without_features)
    CUSTOMIZED_PRUNERS.setdefault(KeyDot, KeyDotPruner())
    heads = _head_types()
    for m in model.modules():
        if isinstance(m, heads):
            TRACE_FORMS.setdefault(type(m), head_trace)  # exact types: Segment, Pose, OBB each get it
    n = rewrite_yolo(model)
    if n:
        log.info("%s: %d Ultralytics block(s) rewritten into prunable forms (same outputs)", type(model).__name__, n)
    return n
