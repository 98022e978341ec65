"""The weights each channel of a prunable group touches: what group lasso and channel GMP act on.

Channel ``c`` of a unit (one torch-pruning group) owns: its producers' output rows (conv/linear weight rows and
biases, the affine scale and shift of the norms after them) and its consumers' input columns (conv/linear weight
columns). Structured pruning removes all of them together, so they are regularised and masked together:
``UnitChannels.sq_norms()`` is the squared L2 norm over all of them, per channel, and
``UnitChannels.keep_masks(dead)`` the parameter masks that zero a set of channels entirely (the masked model then
computes exactly what the physically pruned model computes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.pruning.structured.graph import PruningGraph, Unit

log = logging.getLogger(__name__)

NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


@dataclass(eq=False)
class ChannelSlice:
    """One parameter's share of a unit: entry ``idxs[k]`` along ``dim`` belongs to the unit's channel ``root[k]``.

    ``groups > 1`` marks the input side of a grouped convolution: its weight is ``(out, in / groups, *kernel)`` and
    input channel ``i`` is column ``i % (in / groups)`` of the rows of block ``i // (in / groups)``.
    """

    module: nn.Module
    pname: str  # "weight" or "bias"
    dim: int
    idxs: torch.Tensor  # (n,) long: indices along ``dim`` (input channels for a grouped conv)
    root: torch.Tensor  # (n,) long: the unit channel each index belongs to
    label: str
    groups: int = 1
    _dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.pname)

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._dev:
            self._dev[device] = (self.idxs.to(device), self.root.to(device))
        return self._dev[device]

    def channel_count(self) -> int:
        p = self.param
        return p.shape[1] * self.groups if self.groups > 1 else p.shape[self.dim]

    def per_index_sq(self) -> torch.Tensor:
        """Squared L2 norm of the parameter per index along ``dim`` (differentiable), shape (channel_count,)."""
        w = self.param.float().pow(2)
        if self.groups > 1:
            out, ipg = w.shape[0], w.shape[1]
            return w.reshape(self.groups, out // self.groups, ipg, -1).sum(dim=(1, 3)).reshape(-1)  # (in,)
        return w.movedim(self.dim, 0).reshape(w.shape[self.dim], -1).sum(dim=1)

    def keep_mask(self, dead: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the parameter's shape, False on the entries of the unit channels where ``dead``."""
        p = self.param
        idxs, root = self.indices(p.device)
        gone = torch.zeros(self.channel_count(), dtype=torch.bool, device=p.device)
        gone[idxs[dead.to(p.device)[root]]] = True
        if self.groups > 1:
            out, ipg = p.shape[0], p.shape[1]
            m = gone.view(self.groups, 1, ipg).expand(self.groups, out // self.groups, ipg).reshape(out, ipg)
            m = m.view(out, ipg, *([1] * (p.dim() - 2)))
        else:
            shape = [1] * p.dim()
            shape[self.dim] = -1
            m = gone.view(shape)
        return ~m.expand_as(p)


@dataclass(eq=False)
class UnitChannels:
    """The channels of one unit and every parameter slice they own."""

    unit: Unit
    slices: list[ChannelSlice]

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def channels(self) -> int:
        return self.unit.channels

    def sq_norms(self, weights_only: bool = False) -> torch.Tensor:
        """(channels,) float32: squared L2 norm over all the parameters each channel owns (differentiable).

        ``weights_only``: only the ``weight`` parameters (no biases, norm shifts or bare parameters), as the
        engine's ``l1``/``l2`` criteria and the unstructured masks see a channel.
        """
        dev = self.slices[0].param.device
        acc = torch.zeros(self.channels, device=dev)
        for s in self.slices:
            if weights_only and s.pname != "weight":
                continue
            idxs, root = s.indices(dev)
            acc = acc.index_add(0, root, s.per_index_sq()[idxs])
        return acc

    def keep_masks(self, dead: torch.Tensor) -> Iterator[tuple[ChannelSlice, torch.Tensor]]:
        for s in self.slices:
            yield s, s.keep_mask(dead)


def unit_channels(graph: PruningGraph, unit: Unit) -> UnitChannels:
    """Collect the parameter slices of ``unit`` from its torch-pruning group (deduplicated per parameter and dim)."""
    slices: list[ChannelSlice] = []
    seen: set[tuple[int, str, int]] = set()

    def add(module: nn.Module, pname: str, dim: int, idxs: list[int], root: list[int], side: str,
            groups: int = 1) -> None:
        p = getattr(module, pname, None)
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            return
        key = (id(module), pname, dim if groups == 1 else -groups)
        if key in seen:
            return
        seen.add(key)
        owner = graph.name(module)
        label = f"{owner + '.' if owner else ''}{pname}[{side}]"
        slices.append(ChannelSlice(module, pname, dim, torch.as_tensor(list(idxs), dtype=torch.long),
                                   torch.as_tensor(list(root), dtype=torch.long), label, groups))

    owners: dict[int, tuple[nn.Module, str]] = {}
    for i, (dep, idxs) in enumerate(unit.group):
        m = dep.target.module
        root = unit.group[i].root_idxs
        if root is None or any(r is None for r in root):
            continue
        idxs = [int(k) for k in idxs]
        if isinstance(m, nn.Parameter):  # a bare parameter (ViT cls_token, pos_embed): pruned along pruning_dim
            if not owners:
                owners = {id(p): (mod, n) for mod in graph.model.modules() for n, p in mod.named_parameters(
                    recurse=False)}
            if id(m) in owners:
                add(*owners[id(m)], graph.DG.module2node[m].pruning_dim % m.dim(), idxs, root, "out")
            continue
        if not isinstance(m, nn.Module) or next(m.parameters(recurse=False), None) is None:
            continue
        _add_module(graph, m, graph.DG.is_out_channel_pruning_fn(dep.handler), idxs, root, add)
    return UnitChannels(unit, slices)


def _add_module(graph: PruningGraph, m: nn.Module, out: bool, idxs: list[int], root: list[int],
                add: Callable[..., None]) -> None:
    """The slices of module ``m`` in a group: its output channels (``out``) or its input channels."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.transposed and m.groups != 1:
            log.debug("sparse: skipping grouped transposed conv %s", graph.name(m))
            return
        if out:
            add(m, "weight", 1 if m.transposed else 0, idxs, root, "out")
            add(m, "bias", 0, idxs, root, "out")
        elif m.transposed:
            add(m, "weight", 0, idxs, root, "in")
        elif m.groups == 1:
            add(m, "weight", 1, idxs, root, "in")
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: input channel c is output channel c
            add(m, "weight", 0, idxs, root, "out")
        else:
            add(m, "weight", 1, idxs, root, "in", groups=m.groups)
    elif isinstance(m, nn.Linear):
        if out:
            add(m, "weight", 0, idxs, root, "out")
            add(m, "bias", 0, idxs, root, "out")
        else:
            add(m, "weight", 1, idxs, root, "in")
    elif isinstance(m, NORMS):
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 1:
                add(m, pname, 0, idxs, root, "out")
    else:
        log.debug("sparse: %s (%s) has parameters of a kind not regularised per channel",
                  graph.name(m), type(m).__name__)
