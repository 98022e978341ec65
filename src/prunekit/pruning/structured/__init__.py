"""Structured pruning: whole channels (and attention heads) removed with torch-pruning's dependency graph.

Example:
    >>> from prunekit.pruning.structured import prune
    >>> report = prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.5)
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
from prunekit.pruning.structured.engine import prune, prune_with_settings
from prunekit.pruning.structured.presets import PRESETS, list_presets, register_preset
from prunekit.pruning.structured.report import GroupRecord, PruneReport
from prunekit.pruning.structured.settings import PruneSettings

__all__ = ["CRITERIA", "PRESETS", "CalibContext", "Criterion", "GroupRecord", "PruneReport", "PruneSettings",
           "get_criterion", "list_criteria", "list_presets", "prune", "prune_with_settings", "recalibrate_bn",
           "register_criterion", "register_preset"]
