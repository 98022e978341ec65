"""``l1_group``: group lasso over the prunable groups (an L1 penalty on per-channel group norms).

The penalty is ``sum over groups, sum over channels c of ||w_c||_2``, where ``w_c`` is every weight channel ``c``
owns in its torch-pruning group: producer rows and biases, norm scales and shifts, consumer columns
(``channels.py``). Its gradient pulls each channel's weights toward zero along their own direction with the same
force ``lam`` whatever their size, so weak channels reach (near) zero first and a magnitude criterion
(``l1``/``l2``) then removes them with little loss. (Yuan & Lin 2006; Wen et al. 2016, "Learning Structured
Sparsity in Deep Neural Networks"; Fang et al. 2023, DepGraph.)
"""

from __future__ import annotations

import torch

from prunekit.errors import PruningError
from prunekit.pruning.sparse_train.base import SparseMethod, register_sparse_method
from prunekit.pruning.sparse_train.channels import UnitChannels, unit_channels
from prunekit.pruning.structured.graph import PruningGraph

EPS = 1e-12  # inside the square root: the norm's gradient stays finite (zero) at an all-zero channel


def channel_norms(units: list[UnitChannels]) -> list[torch.Tensor]:
    """Per unit, the (channels,) L2 norms of the weights each channel owns (differentiable)."""
    return [(u.sq_norms() + EPS).sqrt() for u in units]


def weak_fraction(norms: list[torch.Tensor], rel: float = 1e-2) -> float:
    """Fraction of all channels whose norm is below ``rel`` x the largest norm of their group."""
    weak = sum(int((n < rel * n.max()).sum()) for n in norms)
    return weak / max(1, sum(n.numel() for n in norms))


@register_sparse_method("l1_group", help="group lasso: lam x sum of the per-channel L2 norms of each prunable group")
class GroupLasso(SparseMethod):
    """Group lasso over the channels of every prunable group.

    Example:
        >>> m = GroupLasso(lam=1e-4).attach(model, torch.randn(1, 3, 32, 32))
        >>> loss = F.cross_entropy(model(x), y) + m.penalty()
    """

    default_lam = 1e-4

    def setup(self, graph: PruningGraph) -> None:
        self.channels = [unit_channels(graph, u) for u in self.units]
        self.channels = [c for c in self.channels if c.slices]
        if not self.channels:
            raise PruningError(f"l1_group: none of the {len(self.units)} prunable groups of "
                               f"{type(graph.model).__name__} has conv/linear/norm weights to regularise")

    def regularizer(self) -> torch.Tensor:
        return torch.stack([n.sum() for n in channel_norms(self.channels)]).sum()

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        with torch.no_grad():
            out["sparse_weak_channels"] = weak_fraction(channel_norms(self.channels))
        return out
