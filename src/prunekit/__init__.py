"""prunekit: make trained PyTorch networks smaller and faster by pruning, end to end."""

__version__ = "0.2.1"

from prunekit.errors import ConfigError, DataNotFoundError, PrunekitError, PruningError, RunDirError  # noqa: E402
from prunekit.measure import count_macs, count_params  # noqa: E402
from prunekit.models import create_model, list_models, register_model  # noqa: E402
from prunekit.runs import load_model, save_model  # noqa: E402

_LAZY = {
    "prune": "prunekit.pruning", "PruneReport": "prunekit.pruning", "StructuredConfig": "prunekit.pruning",
    "SparsityConfig": "prunekit.pruning", "WidthConfig": "prunekit.pruning", "DepthConfig": "prunekit.pruning",
    "Target": "prunekit.pruning", "Layers": "prunekit.pruning", "Calibration": "prunekit.pruning",
    "Compensation": "prunekit.pruning", "Reconstruction": "prunekit.pruning", "Latency": "prunekit.pruning",
    "StructuredPruner": "prunekit.pruning", "fit": "prunekit.train", "evaluate": "prunekit.train",
    "TrainSettings": "prunekit.train", "recalibrate_bn": "prunekit.pruning", "ModelSpec": "prunekit.runs",
    "save_exported": "prunekit.export.exported", "register_attention": "prunekit.pruning.structured.declare",
    "AttentionLayout": "prunekit.pruning.structured.declare",
    "register_channel_mapping": "prunekit.pruning.structured.declare", "quantize": "prunekit.quantize",
    "QuantizeConfig": "prunekit.quantize", "QuantizeReport": "prunekit.quantize"
}


def __getattr__(name: str):
    """``prunekit.prune`` and friends, imported on first use (torch-pruning is slow to import)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


__all__ = [
    "prune", "PruneReport", "StructuredConfig", "SparsityConfig", "WidthConfig", "DepthConfig", "Target", "Layers",
    "Calibration", "Compensation", "Reconstruction", "Latency", "StructuredPruner", "recalibrate_bn", "fit",
    "evaluate", "TrainSettings", "ConfigError", "DataNotFoundError", "PruningError", "PrunekitError", "RunDirError",
    "count_macs", "count_params", "create_model", "list_models", "register_model", "load_model", "save_model",
    "ModelSpec", "save_exported", "register_attention", "AttentionLayout", "register_channel_mapping", "quantize",
    "QuantizeConfig", "QuantizeReport",
]
