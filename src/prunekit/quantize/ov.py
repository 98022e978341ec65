"""OpenVINO int8 through NNCF: the float ONNX model converted to OpenVINO (``openvino.convert_model``), quantized
by ``nncf.quantize`` on the calibration batches (fed one sample at a time, as NNCF recommends), saved as IR
(``.xml`` + ``.bin``).

Layers left in float become NNCF's ignored scope: OpenVINO keeps the ONNX node names (``node_Conv_16``, the
bias-less part ``node_Conv_16/WithoutBiases``), so a node and its parts are matched by a pattern.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from prunekit.errors import ExportError
from prunekit.quantize.config import QuantizeConfig
from prunekit.quantize.extras import require
from prunekit.quantize.graph import Feeds

log = logging.getLogger("prunekit.quantize")


def per_sample(feeds: list[Feeds]) -> list[Feeds]:
    """Calibration batches split into batch-1 items (NNCF's statistics assume one sample per item)."""
    out = []
    for f in feeds:
        n = int(next(iter(f.values())).shape[0])
        out += [{k: v[i:i + 1] for k, v in f.items()} for i in range(n)]
    return out


def convert(float_onnx: Path) -> Any:
    """The OpenVINO model of a float ONNX file."""
    ov = require("openvino")
    try:
        return ov.convert_model(str(float_onnx))
    except Exception as e:
        raise ExportError(f"openvino could not convert {str(float_onnx)!r}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e


def save_ir(model: Any, path: Path) -> list[Path]:
    """Save an OpenVINO model as ``path`` (``.xml``) and its ``.bin``, weights kept in float32."""
    ov = require("openvino")
    ov.save_model(model, str(path), compress_to_fp16=False)
    return [path, path.with_suffix(".bin")]


def quantize_ov(float_onnx: Path, out_xml: Path, feeds: list[Feeds], cfg: QuantizeConfig,
                exclude_nodes: list[str] = (), float_xml: Path | None = None) -> Path:
    """Write the int8 OpenVINO IR of ``float_onnx`` to ``out_xml`` (and the float IR to ``float_xml`` if given)."""
    require("openvino")
    nncf = require("nncf")
    model = convert(float_onnx)
    if float_xml is not None:
        save_ir(model, float_xml)
    items = per_sample(feeds)
    single = len(items[0]) == 1
    dataset = nncf.Dataset(items, (lambda f: next(iter(f.values()))) if single else None)
    ignored = nncf.IgnoredScope(patterns=[f"{re.escape(n)}(/.*)?" for n in exclude_nodes], validate=False) \
        if exclude_nodes else None
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[cfg.preset]
    quiet = logging.getLogger("nncf")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        qmodel = nncf.quantize(model, dataset, preset=preset, subset_size=len(items), ignored_scope=ignored,
                               **({} if cfg.per_channel else {"advanced_parameters": _per_tensor(nncf)}))
    except Exception as e:
        raise ExportError(f"nncf could not quantize {str(float_onnx)!r}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
    finally:
        quiet.setLevel(level)
    save_ir(qmodel, out_xml)
    return out_xml


def _per_tensor(nncf: Any) -> Any:
    """NNCF's advanced parameters for one weight scale per tensor."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    return AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(per_channel=False))


def fake_quantize_ops(xml: Path) -> int:
    """How many FakeQuantize ops (the int8 marks OpenVINO compiles into int8 kernels) an IR holds."""
    ov = require("openvino")
    model = ov.Core().read_model(str(xml))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
