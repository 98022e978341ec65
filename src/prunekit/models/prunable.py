"""Pruning-ready forms of torchvision modules whose ``forward`` hard-codes a width that structured pruning changes.

``make_prunable(model)`` swaps these in place (same parameters, same state-dict keys, the same outputs on an unpruned
model); ``create_model("tv:...")`` applies it, so a pruned model rebuilt by ``load_model`` gets them too.

``SwinWindowAttention`` / ``SwinWindowAttentionV2`` (torchvision ``ShiftedWindowAttention``/``V2``)
    torchvision's functional attention takes the head size from the input width (``C // num_heads``) and reshapes
    the heads' output back to ``C``: the residual stream and the attention width are one number. Here the attention
    width is read from ``qkv`` (``qkv.out_features // 3``), so the stream and the heads are pruned independently.
    ``remove_heads(idx)`` also prunes the per-head tables torch-pruning does not know: the relative-position bias
    table (V1), the continuous-bias MLP's last layer and ``logit_scale`` (V2).
``ShuffleBlock`` (torchvision ShuffleNetV2 ``InvertedResidual``) + ``ChannelShuffle``
    the channel shuffle is an explicit permutation (``ChannelShuffle.perm``, a list in ``model.json``) and a
    stride-1 block splits its input at ``branch2[0].in_channels`` instead of halving it: any channel of the stream
    can go, and the shuffle's permutation shrinks with it (``prunekit.pruning.structured.trace`` maps the indices).
``SwinPatchMerging`` / ``SwinPatchMergingV2``
    same forward; only what torch-pruning traces differs (see ``channel_trace``).

Every class has a ``channel_trace(x)``: a forward with the same channel dependencies and none of the spatial
reshapes (window partition, strided slices) that torch-pruning 1.6 cannot map; the graph is traced through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _window_attention(m: nn.Module, x: Tensor, logit_scale: Tensor | None) -> Tensor:
    """torchvision's ``shifted_window_attention`` with the attention width taken from ``qkv``, not from ``x``."""
    B, H, W, C = x.shape  # C: the residual stream (input width)
    ws, shift = m.window_size, list(m.shift_size)
    A = m.qkv.out_features // 3  # attention width: num_heads * head_dim
    heads = m.num_heads
    hd = A // heads
    pad_r, pad_b = (ws[1] - W % ws[1]) % ws[1], (ws[0] - H % ws[0]) % ws[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pH, pW, _ = x.shape
    if ws[0] >= pH:
        shift[0] = 0
    if ws[1] >= pW:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (pH // ws[0]) * (pW // ws[1])
    x = x.view(B, pH // ws[0], ws[0], pW // ws[1], ws[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * nw, ws[0] * ws[1], C)  # (B*nW, N, C)
    qkv_bias = m.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # V2: no key bias
        qkv_bias = torch.cat([qkv_bias[:A], torch.zeros_like(qkv_bias[A:2 * A]), qkv_bias[2 * A:]])
    qkv = F.linear(x, m.qkv.weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B*nW, heads, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + m.get_relative_position_bias()
    if sum(shift) > 0:
        mask = x.new_zeros((pH, pW))
        h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pH // ws[0], ws[0], pW // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(nw, ws[0] * ws[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), A)  # (B*nW, N, A)
    x = F.dropout(m.proj(x), p=m.dropout, training=m.training)
    C = x.shape[-1]  # proj's output: the stream again
    x = x.view(B, pH // ws[0], pW // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def attention_trace(m: nn.Module, x: Tensor) -> Tensor:
    """(B, H, W, C) -> (B, H, W, C) through qkv and proj as modules; channel i of q, k and v are coupled (as in one
    head's dot products), no window partition. The split runs on dim 1, where torch-pruning maps it."""
    q, k, v = m.qkv(x).movedim(-1, 1).chunk(3, dim=1)  # (B, A, H, W) each
    return m.proj((v * torch.sigmoid(q * k)).movedim(1, -1))


def _swin_classes() -> tuple[type, type, type, type]:
    from torchvision.models import swin_transformer as tv

    return tv.ShiftedWindowAttention, tv.ShiftedWindowAttentionV2, tv.PatchMerging, tv.PatchMergingV2


_SWA, _SWA2, _PM, _PM2 = _swin_classes()


class SwinWindowAttention(_SWA):
    """torchvision ``ShiftedWindowAttention`` whose attention width is ``qkv.out_features // 3``."""

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x, None)

    def channel_trace(self, x: Tensor) -> Tensor:
        return attention_trace(self, x)

    def remove_heads(self, heads: list[int]) -> None:
        """Drop the per-head columns of the relative-position bias table (qkv/proj are pruned by torch-pruning)."""
        keep = [h for h in range(self.num_heads) if h not in set(heads)]
        t = self.relative_position_bias_table
        self.relative_position_bias_table = nn.Parameter(t.data[:, keep].clone(), requires_grad=t.requires_grad)
        self.num_heads = len(keep)


class SwinWindowAttentionV2(_SWA2):
    """torchvision ``ShiftedWindowAttentionV2`` whose attention width is ``qkv.out_features // 3``."""

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x, self.logit_scale)

    def channel_trace(self, x: Tensor) -> Tensor:
        return attention_trace(self, x)

    def remove_heads(self, heads: list[int]) -> None:
        """Drop the heads' rows of ``logit_scale`` and of the continuous-bias MLP's output layer."""
        keep = [h for h in range(self.num_heads) if h not in set(heads)]
        ls = self.logit_scale
        self.logit_scale = nn.Parameter(ls.data[keep].clone(), requires_grad=ls.requires_grad)
        last = self.cpb_mlp[-1]
        last.weight = nn.Parameter(last.weight.data[keep].clone(), requires_grad=last.weight.requires_grad)
        if last.bias is not None:
            last.bias = nn.Parameter(last.bias.data[keep].clone(), requires_grad=last.bias.requires_grad)
        last.out_features = len(keep)
        self.num_heads = len(keep)


def merging_trace(m: nn.Module, x: Tensor, norm_first: bool) -> Tensor:
    """The 4-way channel concat of patch merging without its strided spatial slices: channel i of the input goes to
    i, C+i, 2C+i, 3C+i of the concat, as in torchvision's ``_patch_merging_pad``."""
    x = torch.cat([x.clone() for _ in range(4)], dim=-1)  # four distinct nodes, one per neighbour
    return m.reduction(m.norm(x)) if norm_first else m.norm(m.reduction(x))


class SwinPatchMerging(_PM):
    def channel_trace(self, x: Tensor) -> Tensor:
        return merging_trace(self, x, norm_first=True)


class SwinPatchMergingV2(_PM2):
    def channel_trace(self, x: Tensor) -> Tensor:
        return merging_trace(self, x, norm_first=False)


# ----------------------------------------------------------------------------------------------- ShuffleNetV2
class ChannelShuffle(nn.Module):
    """``out[:, p] = x[:, perm[p]]``: torchvision's ``channel_shuffle`` as an explicit permutation (prunable)."""

    def __init__(self, channels: int, groups: int = 2):
        super().__init__()
        per = channels // groups
        # channel_shuffle: view (B, g, C/g) -> transpose -> (B, C/g, g): position c*g + gi holds input gi*C/g + c
        self.perm = [gi * per + c for c in range(per) for gi in range(groups)]

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, torch.tensor(self.perm, dtype=torch.long, device=x.device))

    def remove_inputs(self, idxs: list[int]) -> None:
        """Drop input channels ``idxs`` and the output positions they fed; the rest keep their order."""
        gone = set(int(i) for i in idxs)
        rank = {c: r for r, c in enumerate(c for c in range(len(self.perm)) if c not in gone)}
        self.perm = [rank[c] for c in self.perm if c not in gone]

    def extra_repr(self) -> str:
        return f"channels={len(self.perm)}"


def _shuffle_class() -> type:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return InvertedResidual


class ShuffleBlock(_shuffle_class()):
    """torchvision ShuffleNetV2 ``InvertedResidual`` with an explicit shuffle and a split sized by ``branch2``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            c2 = self.branch2[0].in_channels
            x1, x2 = x.split([x.shape[1] - c2, c2], dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


_SWAPS: dict[type, type] = {_SWA: SwinWindowAttention, _SWA2: SwinWindowAttentionV2, _PM: SwinPatchMerging,
                            _PM2: SwinPatchMergingV2, _shuffle_class(): ShuffleBlock}


def make_prunable(model: nn.Module) -> int:
    """Swap torchvision Swin attention / patch merging and ShuffleNetV2 blocks for their prunable forms, in place
    (exact class match: subclasses someone else wrote are left alone). Returns how many modules were swapped."""
    n = 0
    for m in model.modules():
        new = _SWAPS.get(type(m))
        if new is None:
            continue
        m.__class__ = new
        if new is ShuffleBlock:
            m.shuffle = ChannelShuffle(2 * m.branch2[-3].out_channels, 2)
        n += 1
    return n
