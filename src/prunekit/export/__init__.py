"""Export: ONNX, TorchScript and torch.export (``.pt2``), each verifiable against torch on real inputs.

Example:
    >>> from prunekit.export import export_model
    >>> manifest = export_model(model, torch.randn(2, 3, 32, 32), "out", ["onnx", "torchscript", "exported"],
    ...                         verify_inputs=torch.randn(3, 3, 32, 32))
"""

from prunekit.export import exported, onnx, torchscript  # noqa: F401  (register the formats)
from prunekit.export.core import FORMATS, ExportOptions, Verification, compare_outputs, verify_file
from prunekit.export.onnx import OnnxRunner, export_onnx, ort_session
from prunekit.export.stage import check_verified, export_model

# the ``prunekit export`` stage over run directories (ExportConfig, export_run) is prunekit.pipeline.export
__all__ = ["FORMATS", "ExportOptions", "OnnxRunner", "Verification", "check_verified", "compare_outputs",
           "export_model", "export_onnx", "ort_session", "verify_file"]
