"""``variance_concentration``: make each prunable layer's activation variance sit in few channels.

The channels of every prunable group are read where the ``variance`` criterion (VBP) reads them: at the input of
each conv/linear layer consuming them (``stats.consumers``; a forward pre-hook: ``fc2``'s input is
``GELU(fc1(x))``, a ResNet block's ``conv2`` input is ``ReLU(BN(conv1(x)))``, a residual group's consumers read the
stream). Per channel, ``v`` is the variance over the batch and every other non-channel dimension (space, tokens),
averaged over the positions a flatten spreads the channel to and over the group's consumers. With
``p = v / sum(v)`` the group's entropy is ``H = -sum p log p``, divided by ``log C`` so that it lies in [0, 1]
whatever the width ``C``; the penalty is the mean of ``H`` over the groups. It is differentiable; minimising it
concentrates the variance in few channels, so VBP can remove the rest with little change to what the next layer
sees.

Only forward passes with gradients enabled are recorded (evaluation under ``torch.no_grad`` is not), and each new
forward pass of the model discards what the previous one recorded: ``penalty()`` reads the latest forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.measure import call_model
from prunekit.pruning.sparse_train.base import SparseMethod, register_sparse_method
from prunekit.pruning.structured.graph import PruningGraph, Unit
from prunekit.pruning.structured.stats import consumers


def normalized_entropy(v: torch.Tensor) -> torch.Tensor:
    """Entropy of ``p = v / sum(v)`` divided by ``log(len(v))``: 1 for equal variances, -> 0 for one channel.

    A tiny floor (1e-6 of the mean variance) keeps ``log p`` and the gradient finite for dead channels.
    """
    v = v.float()
    v = v + (1e-6 * v.detach().mean() + 1e-20)
    p = v / v.sum()
    return -(p * p.log()).sum() / math.log(v.numel())


def channel_variance(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(C,) variance of each channel of ``x`` over all other dimensions (batch, space, tokens)."""
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.float().var(dim=dims, unbiased=False)


@dataclass(eq=False)
class _Point:
    """Where a unit's channels are read: the input features ``idxs`` of one consumer, channel ``root`` each."""

    unit: str
    channels: int  # the unit's channel count
    idxs: torch.Tensor  # (n,) input features of the consumer that carry the unit's channels
    root: torch.Tensor  # (n,) the unit channel of each (a flatten spreads one channel over several features)
    count: torch.Tensor  # (channels,) features per channel
    _dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idxs, root, count) on ``device`` (copied once per device)."""
        if device not in self._dev:
            self._dev[device] = (self.idxs.to(device), self.root.to(device), self.count.to(device))
        return self._dev[device]


def _points(unit: Unit) -> list[tuple[nn.Module, _Point]]:
    """The unit's consumers, as the ``variance`` criterion reads them (``stats.consumers``: conv with groups=1 and
    linear layers); a unit consumed only by grouped convolutions is read at their inputs instead."""
    found = [(c.module, c.idxs, c.root_idxs) for c in consumers(unit.group)]
    if not found:
        for i, (dep, idxs) in enumerate(unit.group):
            m, root = dep.target.module, unit.group[i].root_idxs
            if (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
                    and not unit.group._DG.is_out_channel_pruning_fn(dep.handler) and root is not None):
                found.append((m, [int(k) for k in idxs], [int(r) for r in root]))
    out = []
    for m, idxs, root in found:
        root_t = torch.as_tensor(root, dtype=torch.long)
        count = torch.zeros(unit.channels).index_add_(0, root_t, torch.ones(len(root))).clamp_min(1)
        out.append((m, _Point(unit.name, unit.channels, torch.as_tensor(idxs, dtype=torch.long), root_t, count)))
    return out


@register_sparse_method("variance_concentration",
                        help="lam x mean entropy of the channel-variance distribution at each prunable layer's output")
class VarianceConcentration(SparseMethod):
    """Entropy of each prunable layer's normalised channel-variance distribution, averaged over layers.

    Example:
        >>> m = VarianceConcentration(lam=0.1).attach(model, torch.randn(1, 3, 32, 32))
        >>> out = model(x)                       # the hooks record the activations
        >>> loss = F.cross_entropy(out, y) + m.penalty()
    """

    default_lam = 0.1

    def setup(self, graph: PruningGraph) -> None:
        points: dict[nn.Module, list[_Point]] = {}
        for u in self.units:
            if u.channels < 2:
                continue
            for m, pt in _points(u):
                points.setdefault(m, []).append(pt)
        if not points:
            raise PruningError(f"variance_concentration: no prunable group of {type(graph.model).__name__} feeds a "
                               "conv/linear layer, so there is no post-activation output to regularise")
        self.points = points
        self.layer_names = [graph.name(m) for m in points]
        self._records: dict[str, list[torch.Tensor]] = {}
        self._handles = [self.model.register_forward_pre_hook(self._new_forward)]
        self._handles += [m.register_forward_pre_hook(self._record) for m in points]

    def detach(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self._records = {}

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self._records = {}

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        # conv input (B, C, *spatial): channels on dim 1; linear input (..., C): channels last
        var = channel_variance(x, 1 if isinstance(module, nn.modules.conv._ConvNd) else -1)  # (C_in,)
        for pt in self.points[module]:
            idxs, root, count = pt.on(var.device)
            v = torch.zeros(pt.channels, device=var.device).index_add(0, root, var[idxs])  # (channels,)
            self._records.setdefault(pt.unit, []).append(v / count)

    def regularizer(self) -> torch.Tensor:
        if not self._records:
            raise PruningError("variance_concentration: no activations were recorded; call penalty() after a "
                               "forward pass of the attached model with gradients enabled")
        # per unit: the mean over its consumers (as the variance criterion scores it), then one entropy per unit
        h = torch.stack([normalized_entropy(torch.stack(vs).mean(0)) for vs in self._records.values()]).mean()
        self._records = {}
        return h

    def entropy(self, model_inputs: Any) -> float:
        """The penalty's value (mean normalised entropy) on ``model_inputs``, measured in eval mode (BatchNorm
        running statistics untouched), without weighting by ``lam``."""
        self._require_attached()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():  # the hooks record only passes with gradients
                call_model(self.model, model_inputs)
            with torch.no_grad():
                return float(self.regularizer())
        finally:
            self.model.train(was_training)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if "sparse_penalty" in out:
            out["sparse_entropy"] = out.pop("sparse_penalty")
        return out
