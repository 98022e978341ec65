"""Structured pruning: whole channels (and attention heads) removed with torch-pruning's dependency graph.

Example:
    >>> from prunekit.pruning.structured import StructuredConfig, StructuredPruner
    >>> report = StructuredPruner(model, torch.randn(1, 3, 32, 32), StructuredConfig(criterion="l1")).run()
    >>> report = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.5)  # transactional
"""

from prunekit.pruning.structured.bn import recalibrate_bn
from prunekit.pruning.structured.criteria import (
    CRITERIA,
    CalibContext,
    Criterion,
    get_criterion,
    list_criteria,
    register_criterion,
)
from prunekit.pruning.structured.engine import StructuredPruner, prune_with_settings
from prunekit.pruning.structured.presets import PRESETS, list_presets, register_preset
from prunekit.pruning.structured.report import GroupRecord, PruneReport
from prunekit.pruning.structured.settings import (
    Calibration,
    Compensation,
    Latency,
    Layers,
    PruneSettings,
    Reconstruction,
    StructuredConfig,
    Target,
)

__all__ = ["CRITERIA", "PRESETS", "CalibContext", "Calibration", "Compensation", "Criterion", "GroupRecord", "Latency",
           "Layers", "PruneReport", "PruneSettings", "Reconstruction", "StructuredConfig", "StructuredPruner", "Target",
           "get_criterion", "list_criteria", "list_presets", "prune", "prune_with_settings", "recalibrate_bn",
           "register_criterion", "register_preset"]


def __getattr__(name: str):
    if name == "prune":  # the transactional entry of every family (prunekit.pruning.api)
        from prunekit.pruning.api import prune

        return prune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
