"""Per-layer int8 sensitivity: which layers int8 hurts most.

Each quantizable layer is left in float in turn, the rest quantized ("all but one", ONNX Runtime's
``nodes_to_exclude``), and the model's output error against float is measured on the calibration batches. A layer
whose float copy removes much of the error is one int8 hurts: ``gain`` = error(all int8) - error(all but this one),
as a share of error(all int8). Calibration runs once (ONNX Runtime's range cache), so a layer costs one
quantization pass and one run over the calibration batches.

The ranking is made with ONNX Runtime's quantizer for either backend: both quantize the same float ONNX graph, and
its layer names apply to both (``keep_float``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from prunekit.quantize.config import QuantizeConfig
from prunekit.quantize.graph import Feeds, Layer
from prunekit.quantize.ort import quantize_ort
from prunekit.quantize.runner import OrtRunner, output_error

log = logging.getLogger("prunekit.quantize")


@dataclass
class LayerSensitivity:
    """How much of the int8 output error leaving one layer in float removes."""

    layer: str
    node: str
    op: str
    rel_error_without: float  # output error with this layer in float, the rest int8
    gain: float  # (error all int8 - error without) / error all int8: the share of the error this layer causes

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_sensitivity(float_onnx: Path, feeds: list[Feeds], cfg: QuantizeConfig, candidates: list[Layer],
                      excluded: list[str] = ()) -> tuple[float, list[LayerSensitivity]]:
    """``(error with every candidate in int8, [LayerSensitivity, worst first])``.

    Args:
        float_onnx: the (pre-processed) float ONNX model.
        feeds: calibration batches: ranges come from them, and the error is measured on them.
        cfg: the quantization options (types, per-channel ...); ``backend`` is not used (see the module doc).
        candidates: the layers to rank.
        excluded: ONNX node names left in float in every trial (``keep_float``).
    """
    reference = OrtRunner(float_onnx, cfg.threads)
    with tempfile.TemporaryDirectory(prefix="prunekit-sensitivity-") as tmp:
        cache = Path(tmp) / "ranges.json"

        def error(exclude: list[str]) -> float:
            path = quantize_ort(float_onnx, Path(tmp) / "trial.onnx", feeds, cfg, [*excluded, *exclude], cache)
            return output_error(reference, OrtRunner(path, cfg.threads), feeds)["rel_error"]

        base = error([])
        rows = []
        for i, la in enumerate(candidates):
            without = error([la.node])
            gain = (base - without) / base if base > 0 else 0.0
            rows.append(LayerSensitivity(la.name, la.node, la.op, without, gain))
            log.info("quantize: sensitivity %d/%d %s: error %.3g with it in float (all int8: %.3g), gain %.1f%%",
                     i + 1, len(candidates), la.name, without, base, 100 * gain)
    rows.sort(key=lambda r: r.gain, reverse=True)
    return base, rows
