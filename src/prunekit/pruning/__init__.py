"""Pruning: one entry, ``prune(model, example_inputs, config, calib_data=...)`` (``api.py``), for the families
``structured`` (channels and heads, on torch-pruning's dependency graph), ``unstructured`` (masks, N:M) and ``llm``
(decoder-LM width). Every call is a transaction (``transaction.py``).

Example:
    >>> report = prunekit.pruning.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", ratio=0.5)
"""

from prunekit.pruning.api import prune
from prunekit.pruning.llm.depth import DepthConfig
from prunekit.pruning.llm.width import WidthSettings as WidthConfig
from prunekit.pruning.structured import (
    CalibContext,
    Calibration,
    Compensation,
    Criterion,
    Latency,
    Layers,
    PruneReport,
    PruneSettings,
    Reconstruction,
    StructuredConfig,
    StructuredPruner,
    Target,
    get_criterion,
    list_criteria,
    list_presets,
    recalibrate_bn,
    register_criterion,
)
from prunekit.pruning.unstructured.settings import SparsifySettings as SparsityConfig

__all__ = [
    "CalibContext", "Calibration", "Compensation", "Criterion", "DepthConfig", "Latency", "Layers", "PruneReport",
    "PruneSettings", "Reconstruction", "SparsityConfig", "StructuredConfig", "StructuredPruner", "Target",
    "WidthConfig", "get_criterion", "list_criteria", "list_presets", "prune", "recalibrate_bn", "register_criterion",
]
