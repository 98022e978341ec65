"""Unstructured pruning: zero individual weights (or N:M groups, kernels, kernel patterns) behind masks.

Methods (``list_methods()``): ``l1``, ``global``, ``taylor``, ``movement``, ``random``, ``nm`` (N:M, 2:4 by default),
``kernel``, ``intra-kernel``. Schedules: one-shot, iterative, gradual (cubic). The first layer and the classifier stay
dense by default. Masks are ``weight_mask`` buffers (``masks.py``): they are saved with the weights and re-attached
when a run directory is loaded (this package registers the ``"sparsity"`` load hook on import).

Unstructured sparsity does not make a model faster with dense kernels; ``SparsityReport`` says so, counts what it
saves on disk, and times 2:4 weights on sparse tensor cores where a suitable GPU exists.

Example:
    >>> from prunekit.pruning.unstructured import sparsify
    >>> report = sparsify(model, "global", 0.8, example_inputs=torch.randn(1, 3, 32, 32))
    >>> print(report.table())
"""

from prunekit.pruning.unstructured.layers import PRUNABLE, LayerSelection, select_layers
from prunekit.pruning.unstructured.masks import (
    MASK,
    MaskKeeper,
    apply_masks,
    fold_masks,
    get_mask,
    masked_layers,
    remove_masks,
    set_mask,
)
from prunekit.pruning.unstructured.methods import METHODS, Method, get_method, list_methods, register_method
from prunekit.pruning.unstructured.patterns import nm_mask, nm_violations, parse_nm, pattern_mask
from prunekit.pruning.unstructured.report import LayerSparsity, SparsityReport, layer_storage
from prunekit.pruning.unstructured.schedules import SCHEDULES, GradualSchedule, cubic_sparsity, iterative_targets
from prunekit.pruning.unstructured.semi_structured import measure_2to4_latency, semi_structured_support
from prunekit.pruning.unstructured.settings import SparsifySettings
from prunekit.pruning.unstructured.sparsifier import Sparsifier, sparsify

__all__ = ["MASK", "METHODS", "PRUNABLE", "SCHEDULES", "GradualSchedule", "LayerSelection", "LayerSparsity",
           "MaskKeeper", "Method", "SparsifySettings", "Sparsifier", "SparsityReport", "apply_masks",
           "cubic_sparsity", "fold_masks", "get_mask", "get_method", "iterative_targets", "layer_storage",
           "list_methods", "masked_layers", "measure_2to4_latency", "nm_mask", "nm_violations", "parse_nm",
           "pattern_mask", "register_method", "remove_masks", "select_layers", "semi_structured_support", "set_mask",
           "sparsify"]
