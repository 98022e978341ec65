"""Sparse pre-training: regularisers that prepare a trained model for structured pruning.

Methods (``list_sparse_methods()``), each acting on the groups ``prunekit.prune`` would prune:
    ``l1_group``                group lasso on the per-channel norms of every prunable group
    ``bn_l1``                   network slimming: L1 on the BatchNorm scales of the prunable groups
    ``gmp``                     gradual magnitude pruning of whole channels on a cubic schedule
    ``variance_concentration``  entropy of each prunable layer's channel-variance distribution (for VBP)

Choosing ``lam``: group lasso and network slimming pull every channel toward zero by about ``lam x lr`` per step
(``/ (1 - momentum)`` with SGD momentum), so the total pull scales with ``lam x lr x steps``: the defaults (1e-4,
the papers' values) suit ImageNet-length runs; a few hundred steps need 1e-2 to 5e-2 (resnet20 on digits:
0.05 helped, 0.2 zeroed the whole network). The variance-concentration gradient vanishes at equal variances (the
entropy's maximum), so it starts slowly; ``gmp`` has no ``lam``, only ``sparsity`` and its schedule.

Example:
    >>> from prunekit.pruning.sparse_train import make_sparse_training
    >>> st = make_sparse_training(model, "l1_group", 1e-4, torch.randn(1, 3, 32, 32), total_steps=epochs * len(dl))
    >>> loss_fn, callbacks = st
    >>> prunekit.train.fit(model, dl, val_dl, settings, loss_fn=loss_fn, callbacks=callbacks)
    >>> st.finalize()
"""

from prunekit.pruning.sparse_train import bn_l1, gmp, group_lasso, variance  # noqa: F401  (register the methods)
from prunekit.pruning.sparse_train.base import (
    SPARSE_METHODS,
    SparseMethod,
    check_lam,
    list_sparse_methods,
    register_sparse_method,
)
from prunekit.pruning.sparse_train.bn_l1 import BNL1
from prunekit.pruning.sparse_train.channels import UnitChannels, unit_channels
from prunekit.pruning.sparse_train.gmp import GMP
from prunekit.pruning.sparse_train.group_lasso import GroupLasso, channel_norms
from prunekit.pruning.sparse_train.training import (
    SparseSettings,
    SparseTraining,
    make_method,
    make_sparse_training,
)
from prunekit.pruning.sparse_train.variance import VarianceConcentration, channel_variance, normalized_entropy

__all__ = ["BNL1", "GMP", "SPARSE_METHODS", "GroupLasso", "SparseMethod", "SparseSettings", "SparseTraining",
           "UnitChannels", "VarianceConcentration", "channel_norms", "channel_variance", "check_lam",
           "list_sparse_methods", "make_method", "make_sparse_training", "normalized_entropy",
           "register_sparse_method", "unit_channels"]
