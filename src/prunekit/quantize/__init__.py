"""Static post-training int8 for CPU runtimes: ONNX Runtime (QDQ, per-channel weights) and OpenVINO (NNCF).

Example:
    >>> from prunekit.quantize import QuantizeConfig, quantize
    >>> report = quantize(model, torch.randn(1, 3, 32, 32), QuantizeConfig(backend="openvino"),
    ...                   calib_data=calib_loader, out="out/int8", eval_data=test_loader)
"""

from prunekit.quantize.api import QuantizeReport, quantize
from prunekit.quantize.config import BACKENDS, QuantizeConfig
from prunekit.quantize.extras import install_hint, require
from prunekit.quantize.runner import accuracy, load_runner, output_error

__all__ = ["BACKENDS", "QuantizeConfig", "QuantizeReport", "accuracy", "install_hint", "load_runner",
           "output_error", "quantize", "require"]


class _CallableModule(type(__import__("sys"))):
    """``prunekit.quantize`` is this package *and* the entry function: importing the package sets the attribute
    ``prunekit.quantize`` to the package, so calling it calls :func:`quantize`."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return quantize(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
