"""``bn_l1``: network slimming, an L1 penalty on the BatchNorm scales of the prunable groups (Liu et al. 2017).

``lam * sum |gamma|`` is added to the loss; its gradient is the sub-gradient ``lam * sign(gamma)`` the paper adds
to the scales' gradients. Scales driven toward zero mark channels the ``bn_scale`` (or a magnitude) criterion then
removes. Only BatchNorm layers whose channels belong to a prunable group are penalised.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.sparse_train.base import SparseMethod, register_sparse_method
from prunekit.pruning.structured.graph import PruningGraph


@register_sparse_method("bn_l1", help="network slimming: lam x sum |gamma| of the prunable groups' BatchNorms")
class BNL1(SparseMethod):
    """L1 on the BatchNorm scales of the prunable groups.

    Example:
        >>> m = BNL1(lam=1e-4).attach(model, torch.randn(1, 3, 32, 32))
        >>> loss = F.cross_entropy(model(x), y) + m.penalty()
    """

    default_lam = 1e-4

    def setup(self, graph: PruningGraph) -> None:
        bns: dict[int, nn.modules.batchnorm._BatchNorm] = {}
        for u in self.units:
            for dep, _ in u.group:
                m = dep.target.module
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                    bns[id(m)] = m
        if not bns:
            raise PruningError(f"bn_l1 needs affine BatchNorm layers in the prunable groups, and "
                               f"{type(graph.model).__name__} has none there; use l1_group or "
                               "variance_concentration instead")
        self.bns = list(bns.values())
        self.bn_names = [graph.name(m) for m in self.bns]

    def regularizer(self) -> torch.Tensor:
        return torch.stack([bn.weight.abs().sum() for bn in self.bns]).sum()

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        with torch.no_grad():
            g = torch.cat([bn.weight.detach().abs().flatten() for bn in self.bns])
            out["sparse_mean_abs_gamma"] = float(g.mean())
            out["sparse_weak_channels"] = float((g < 1e-2 * g.max()).float().mean())
        return out
