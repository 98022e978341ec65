"""Pruning: ``structured`` (channels and heads, on torch-pruning's dependency graph); ``unstructured`` (masks).

Example:
    >>> report = prunekit.pruning.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.5)
"""

from prunekit.pruning.structured import (
    CalibContext,
    Criterion,
    PruneReport,
    PruneSettings,
    get_criterion,
    list_criteria,
    list_presets,
    prune,
    recalibrate_bn,
    register_criterion,
)

__all__ = ["CalibContext", "Criterion", "PruneReport", "PruneSettings", "get_criterion", "list_criteria",
           "list_presets", "prune", "recalibrate_bn", "register_criterion"]
