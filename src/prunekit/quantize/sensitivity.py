"""Per-layer int8 sensitivity: which layers int8 hurts most.

Each quantizable layer is left in float in turn, the rest quantized ("all but one", ONNX Runtime's
``nodes_to_exclude``), and the model's output error against float is measured on the calibration batches. A layer
whose float copy removes much of the error is one int8 hurts: ``gain`` = error(all int8) - error(all but this one),
as a share of error(all int8). The trials run on the backend asked for (its kernels and its quantizer's choices
differ: NNCF quantizes the input of a classifier after global pooling, ONNX Runtime does not). With ONNX Runtime
calibration runs once (its range cache), so a layer costs one quantization pass and one run over the calibration
batches; NNCF collects its statistics again for each trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prunekit.quantize.config import QuantizeConfig
from prunekit.quantize.graph import Feeds, Layer
from prunekit.quantize.runner import OrtRunner, OvRunner, Runner, output_error

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


def layer_sensitivity(reference: Runner, trial: Callable[[list[str]], Runner], feeds: list[Feeds],
                      candidates: list[Layer], excluded: list[str] = ()) -> tuple[float, list[LayerSensitivity]]:
    """``(error with every candidate in int8, [LayerSensitivity, worst first])``.

    Args:
        reference: the float model's runner.
        trial: ONNX node names to leave in float -> the runner of the model quantized without them.
        feeds: calibration batches, on which the error is measured.
        candidates: the layers to rank.
        excluded: ONNX node names left in float in every trial (``keep_float``).
    """

    def error(exclude: list[str]) -> float:
        return output_error(reference, trial([*excluded, *exclude]), feeds)["rel_error"]

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


def trials(backend: str, float_onnx: Path, feeds: list[Feeds], cfg: QuantizeConfig,
           tmp: Path) -> tuple[Runner, Callable[[list[str]], Runner]]:
    """``(float runner, trial)`` on ``backend``: ONNX Runtime calibrates once (its range cache), NNCF each trial."""
    if backend == "onnxruntime":
        from prunekit.quantize.ort import quantize_ort

        cache = tmp / "ranges.json"
        return OrtRunner(float_onnx, cfg.threads), lambda nodes: OrtRunner(
            quantize_ort(float_onnx, tmp / "trial.onnx", feeds, cfg, nodes, cache), cfg.threads)
    from prunekit.quantize.ov import convert, quantize_ov, save_ir

    save_ir(convert(float_onnx), tmp / "float.xml")
    return OvRunner(tmp / "float.xml", cfg.threads), lambda nodes: OvRunner(
        quantize_ov(float_onnx, tmp / "trial.xml", feeds, cfg, nodes), cfg.threads)
