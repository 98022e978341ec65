"""prunekit: make trained PyTorch networks smaller and faster by pruning, end to end."""

__version__ = "0.1.0"

from prunekit.errors import ConfigError, DataNotFoundError, PruningError, PrunekitError, RunDirError  # noqa: E402
from prunekit.measure import count_macs, count_params  # noqa: E402
from prunekit.models import create_model, list_models, register_model  # noqa: E402
from prunekit.runs import load_model, save_model  # noqa: E402

__all__ = [
    "ConfigError", "DataNotFoundError", "PruningError", "PrunekitError", "RunDirError",
    "count_macs", "count_params", "create_model", "list_models", "register_model", "load_model", "save_model",
]
