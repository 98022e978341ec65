"""Ultralytics YOLO (v8, 11) blocks in forms torch-pruning maps end to end.

torch-pruning 1.6 cannot follow a channel index through a conv whose output is ``split``/``chunk``-ed and whose halves
are both used (C2f, C3k2, C2PSA, PSA): the groups of those convs come out "inconsistent" and stay whole, or (C2PSA,
whose split sizes are fixed numbers) the pruned model fails its forward. ``make_yolo_prunable(model)`` rewrites them in
place into equivalent forms (same outputs on the unpruned model, to float rounding):

``cv1`` + ``split``/``chunk(2)``   two convs ``cv1a`` and ``cv1b`` with ``cv1``'s weights (and BatchNorm) split
                                 between them; the block concatenates their outputs as before (``TwoHalves``).
``Attention`` (PSA, C2PSA)       widths read from its layers, not from the input; torch-pruning sees it as one layer
                                 (``AttentionPruner``): the residual stream through it is pruned (``qkv``'s input,
                                 ``proj``'s output), the heads' inner layout (``qkv``'s output, ``pe``) stays whole.
``Detect`` / ``Segment`` / ``Pose`` heads are traced through ``head_trace``: each level's branch output (box, DFL,
class, mask-coefficient, keypoint channels) is a model output, so those layers keep their size and everything before
them is pruned; ``dfl`` (fixed weights) is not traced.

The classes subclass Ultralytics' own (``isinstance`` checks, ``fuse``, ``export`` keep working). Nothing here imports
``ultralytics`` unless the model was built with it (it is then in ``sys.modules``).
"""

from __future__ import annotations

import copy
import logging
import sys
from functools import cache
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

log = logging.getLogger(__name__)


def split_conv(conv: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """An Ultralytics ``Conv`` (conv + BatchNorm + activation, or conv with bias once fused) -> one ``Conv`` per
    block of ``sizes`` output channels, with the matching rows of its weights (exact: each output channel of a conv and
    a BatchNorm depends on its own row only)."""
    parts, start = [], 0
    for size in sizes:
        part = copy.deepcopy(conv)
        rows = slice(start, start + size)
        c = part.conv
        c.weight = nn.Parameter(conv.conv.weight.data[rows].clone(), requires_grad=conv.conv.weight.requires_grad)
        if c.bias is not None:
            c.bias = nn.Parameter(conv.conv.bias.data[rows].clone(), requires_grad=conv.conv.bias.requires_grad)
        c.out_channels = size
        bn = getattr(part, "bn", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            src = conv.bn
            for k in ("weight", "bias"):
                if getattr(src, k) is not None:
                    setattr(bn, k, nn.Parameter(getattr(src, k).data[rows].clone()))
            bn.running_mean, bn.running_var = src.running_mean[rows].clone(), src.running_var[rows].clone()
            bn.num_features = size
        parts.append(part)
        start += size
    return parts


class TwoHalves:
    """Mixin for blocks whose ``cv1`` output is cut in two halves (C2f family, C2PSA, PSA): ``cv1a`` and ``cv1b``.

    A block not (or no longer: a rolled-back prune restores the original children) rewritten runs its own forward.
    """

    def rewrite(self) -> None:
        c = self.cv1.conv.out_channels // 2
        self.cv1a, self.cv1b = split_conv(self.cv1, [c, c])
        del self.cv1

    def halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cv1a(x), self.cv1b(x)


def _c2f_forward(self: Any, x: Tensor) -> Tensor:
    if "cv1" in self._modules:
        return type(self).__mro__[2].forward(self, x)  # the Ultralytics class it subclasses
    y = list(self.halves(x))
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y, 1))


def _c2psa_forward(self: Any, x: Tensor) -> Tensor:
    if "cv1" in self._modules:
        return type(self).__mro__[2].forward(self, x)
    a, b = self.halves(x)
    return self.cv2(torch.cat((a, self.m(b)), 1))


def _psa_forward(self: Any, x: Tensor) -> Tensor:
    if "cv1" in self._modules:
        return type(self).__mro__[2].forward(self, x)
    a, b = self.halves(x)
    b = b + self.attn(b)
    b = b + self.ffn(b)
    return self.cv2(torch.cat((a, b), 1))


def attention_forward(self: Any, x: Tensor) -> Tensor:
    """Ultralytics ``Attention.forward`` with the widths taken from ``qkv`` (the input's may be pruned)."""
    B, _, H, W = x.shape
    N, nh, kd = H * W, self.num_heads, self.key_dim
    qkv = self.qkv(x)  # (B, nh * (2 kd + hd), H, W): per head q, k, v
    per = qkv.shape[1] // nh
    q, k, v = qkv.view(B, nh, per, N).split([kd, kd, per - 2 * kd], dim=2)
    attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)  # (B, nh, N, N)
    width = nh * (per - 2 * kd)  # the heads' value width (not the stream's)
    out = (v @ attn.transpose(-2, -1)).view(B, width, H, W) + self.pe(v.reshape(B, width, H, W))
    return self.proj(out)


class AttentionPruner(tp.pruner.function.BasePruningFunc):
    """A YOLO ``Attention`` as one layer: its input channels are ``qkv``'s, its output channels ``proj``'s (with
    BatchNorm); the inside (heads' q, k, v layout, ``pe``) is not touched."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        tp.prune_conv_out_channels(layer.proj.conv, idxs)
        if isinstance(getattr(layer.proj, "bn", None), nn.modules.batchnorm._BatchNorm):
            tp.prune_batchnorm_out_channels(layer.proj.bn, idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        tp.prune_conv_in_channels(layer.qkv.conv, idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.conv.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.conv.in_channels


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


@cache
def _classes() -> tuple[dict[type, type], type, type]:
    """(Ultralytics block class -> its prunable subclass, Ultralytics Attention, its prunable subclass)."""
    from ultralytics.nn.modules import block

    swaps: dict[type, type] = {}
    for name, fwd in (("C2f", _c2f_forward), ("C3k2", _c2f_forward), ("C2fCIB", _c2f_forward),
                      ("C2fPSA", _c2f_forward), ("C2PSA", _c2psa_forward), ("PSA", _psa_forward)):
        base = getattr(block, name, None)
        if base is not None:
            swaps[base] = type(f"Prunable{name}", (TwoHalves, base), {"forward": fwd, "forward_split": fwd,
                                                                      "__module__": __name__})
    attn = type("PrunableAttention", (block.Attention,), {"forward": attention_forward, "__module__": __name__})
    for cls in swaps.values():
        globals()[cls.__name__] = cls  # importable by name (a pickled Ultralytics checkpoint refers to it)
    globals()[attn.__name__] = attn
    return swaps, block.Attention, attn


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
    """Rewrite the Ultralytics blocks of ``model`` in place into their prunable forms (see the module docstring) and
    register the head trace and the attention pruner; returns how many modules were rewritten. A model built without
    Ultralytics (it is not imported) is left alone and 0 is returned."""
    if "ultralytics.nn.modules" not in sys.modules:
        return 0
    from ultralytics.nn.tasks import BaseModel

    from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS, TRACE_FORMS
    from prunekit.pruning.structured.verify import OUTPUT_VIEWS

    OUTPUT_VIEWS.setdefault(BaseModel, without_features)
    swaps, attention, prunable_attention = _classes()
    CUSTOMIZED_PRUNERS.setdefault(prunable_attention, AttentionPruner())
    heads = _head_types()
    n = 0
    for m in list(model.modules()):
        if isinstance(m, heads):
            TRACE_FORMS.setdefault(type(m), head_trace)  # exact types: Segment, Pose, OBB each get it
        new = swaps.get(type(m))
        if new is not None and "cv1" in m._modules:
            m.__class__ = new
            m.rewrite()
            n += 1
        elif type(m) is attention:
            m.__class__ = prunable_attention
            n += 1
    if n:
        log.info("%s: %d Ultralytics block(s) rewritten into prunable forms (same outputs)", type(model).__name__, n)
    return n
