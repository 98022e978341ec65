"""Export: ONNX, TorchScript and torch.export (``.pt2``), each verifiable against torch on real inputs.

Example:
    >>> from prunekit.export import export_model
    >>> manifest = export_model(model, torch.randn(2, 3, 32, 32), "out", ["onnx", "torchscript", "exported"],
    ...                         verify_inputs=torch.randn(3, 3, 32, 32))
"""

from prunekit.export import exported, onnx, torchscript  # noqa: F401  (register the formats)
from prunekit.export.core import FORMATS, ExportOptions, Verification, compare_outputs, verify_file
from prunekit.export.onnx import OnnxRunner, export_onnx, ort_session
from prunekit.export.stage import ExportConfig, check_verified, export_model, export_run

__all__ = ["FORMATS", "ExportConfig", "ExportOptions", "OnnxRunner", "Verification", "check_verified",
           "compare_outputs", "export_model", "export_onnx", "export_run", "ort_session", "verify_file"]
