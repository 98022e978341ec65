"""Ultralytics YOLO blocks in forms whose forward survives structured pruning (same outputs unpruned).

``rewrite_yolo(model)`` swaps them in place: blocks whose ``cv1`` output is cut in two (C2f, C3k2, C2fCIB, C2fPSA,
C2PSA, PSA) get two convs ``cv1a`` / ``cv1b`` with ``cv1``'s weights split between them (``TwoHalves``); the PSA
``Attention`` gets one conv per head and role (q, k, v) instead of ``qkv`` (``SplitHeads``), so its value and key
dims are plain channels, pruned per head. The classes subclass Ultralytics' own, so
``isinstance`` checks, ``fuse`` and ``export`` keep working. ``create_model("ultralytics:...")`` applies it, so a model
rebuilt by ``load_model`` has the same layers; the pruning engine applies it too (``pruning.structured.detect``).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn


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


class KeyDot(nn.Module):
    """One head's attention weights ``softmax((scale q)^T k)`` over the keys: queries and keys (B, kd, H, W) ->
    (B, N, N). No weights: to the pruning graph it is the layer that reads the head's key dims, so q's and k's output
    channels are pruned together (``channel_trace``: ``dot(q * k)``) and nothing else depends on them. Removing a key
    dim drops one term of every dot product; there is no output mean to compensate (``no_compensation``)."""

    no_compensation = True

    def __init__(self, scale: float, keys: int, width: int) -> None:
        super().__init__()
        self.scale = scale  # the dense model's key_dim ** -0.5, kept when key dims are pruned
        self.keys, self.width = keys, width  # key dims (input) and the attention's output width (trace only)

    def forward(self, q: Tensor, k: Tensor | None = None) -> Tensor:
        if k is None:  # the trace, q is q * k: one reduction of the key dims, as wide as the attention's output
            return q.sum(1, keepdim=True).expand(-1, self.width, -1, -1)
        return ((q.flatten(2) * self.scale).transpose(-2, -1) @ k.flatten(2)).softmax(dim=-1)


class SplitHeads:
    """Mixin for Ultralytics' PSA ``Attention``: ``qkv`` (per head q, k, v rows) split into one conv per head and
    role (``q.h``, ``k.h``, ``v.h``), so every width is a plain channel count: a head's value dims (``v.h``, their
    ``pe`` channels, ``proj``'s inputs) and its key dims (``q.h`` with ``k.h``) are pruned per head, each head to its
    own width. Not (or no longer: a rolled-back prune) rewritten, it runs Ultralytics' forward."""

    def rewrite(self) -> None:
        nh, kd, hd = self.num_heads, self.key_dim, self.head_dim
        parts = split_conv(self.qkv, [kd, kd, hd] * nh)  # qkv's rows: head 0's q, k, v, then head 1's, ...
        self.q, self.k, self.v = (nn.ModuleList(parts[i::3]) for i in range(3))
        self.dot = nn.ModuleList(KeyDot(self.scale, kd, self.proj.conv.out_channels) for _ in range(nh))
        del self.qkv

    def forward(self, x: Tensor) -> Tensor:
        if "qkv" in self._modules:
            return super().forward(x)
        B, _, H, W = x.shape
        outs, values = [], []
        for q, k, v, dot in zip(self.q, self.k, self.v, self.dot):
            vh = v(x).flatten(2)  # (B, hd_h, N)
            outs.append(vh @ dot(q(x), k(x)).transpose(-2, -1))  # (B, hd_h, N)
            values.append(vh)
        out, v = (torch.cat(t, 1).view(B, -1, H, W) for t in (outs, values))  # heads in order, as Ultralytics
        return self.proj(out + self.pe(v))

    def channel_trace(self, x: Tensor) -> Tensor:
        """The channel dependencies without the (B, N, N) products: values -> ``pe`` -> ``proj``; per head q * k ->
        its ``KeyDot``, whose output joins the attention's output (it carries no channels of its own)."""
        v = torch.cat([v(x) for v in self.v], 1)
        out = self.proj(v + self.pe(v))
        for q, k, dot in zip(self.q, self.k, self.dot):
            dot.keys, dot.width = q.conv.out_channels, out.shape[1]
            out = out + dot(q(x) * k(x))
        return out


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
    attn = type("PrunableAttention", (SplitHeads, block.Attention), {"__module__": __name__})
    for cls in swaps.values():
        globals()[cls.__name__] = cls  # importable by name (a pickled Ultralytics checkpoint refers to it)
    globals()[attn.__name__] = attn
    return swaps, block.Attention, attn


def rewrite_yolo(model: nn.Module) -> int:
    """Swap the Ultralytics blocks of ``model`` for their prunable forms, in place (exact class match); returns how
    many modules were swapped. Blocks already rewritten are skipped."""
    swaps, attention, prunable_attention = _classes()
    n = 0
    for m in list(model.modules()):
        new = type(m) if isinstance(m, TwoHalves) else swaps.get(type(m))  # a rolled-back prune: cv1 is back
        if new is not None and "cv1" in m._modules:
            m.__class__ = new
            m.rewrite()
            n += 1
        elif type(m) is attention or (type(m) is prunable_attention and "qkv" in m._modules):
            m.__class__ = prunable_attention
            m.rewrite()
            n += 1
    return n


def prunable_attention_class() -> type:
    """The prunable subclass of Ultralytics' ``Attention``."""
    return _classes()[2]
