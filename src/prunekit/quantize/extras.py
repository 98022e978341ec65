"""The optional runtimes (``pip install 'prunekit[quantize]'``): a missing one is one ``ConfigError`` naming the
exact ``pip install`` to run."""

from __future__ import annotations

import importlib
from types import ModuleType

from prunekit.errors import ConfigError

# import name -> (what it is for, the pip package)
_EXTRAS = {
    "onnxruntime": ("the onnxruntime backend (and the sensitivity ranking)", "onnxruntime"),
    "onnx": ("reading ONNX models", "onnx"),
    "openvino": ("the openvino backend", "openvino"),
    "nncf": ("the openvino backend (NNCF quantizes for OpenVINO)", "nncf"),
}


def install_hint(name: str) -> str:
    """``pip install 'prunekit[quantize]'`` (or the one package) for the import ``name``."""
    package = _EXTRAS.get(name, ("", name))[1]
    return f"pip install 'prunekit[quantize]' (or: pip install {package})"


def require(name: str) -> ModuleType:
    """Import the optional module ``name``; when it is missing, a ``ConfigError`` naming the pip install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        purpose = _EXTRAS.get(name, ("quantization",))[0]
        raise ConfigError(f"{name} is not installed; it is needed for {purpose}: {install_hint(name)} "
                          f"({type(e).__name__}: {e})") from None


def require_backend(backend: str) -> None:
    """Fail early, before any export or calibration, when ``backend``'s packages are missing."""
    names = ("onnx", "onnxruntime") if backend == "onnxruntime" else ("onnx", "openvino", "nncf")
    for n in names:
        require(n)
