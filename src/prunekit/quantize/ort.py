"""ONNX Runtime static int8: QDQ format, per-channel weights, activations calibrated on a few batches
(``onnxruntime.quantization.quantize_static`` with a ``CalibrationDataReader`` over the calibration feeds)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunekit.errors import ExportError
from prunekit.quantize.config import QuantizeConfig
from prunekit.quantize.extras import require
from prunekit.quantize.graph import Feeds

log = logging.getLogger("prunekit.quantize")
_NOISY = ("root", "onnxruntime")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs its advice on the root logger at WARNING; keep it out of the run log."""
    levels = {n: logging.getLogger(n if n != "root" else None).level for n in _NOISY}
    for n in _NOISY:
        logging.getLogger(n if n != "root" else None).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n if n != "root" else None).setLevel(lv)


def preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation) of ``src`` into ``dst``;
    when it fails the float model is quantized as it is (logged)."""
    from onnxruntime.quantization import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception as e:  # an exotic graph: quantize_static still works without it
        log.warning("quantize: onnxruntime pre-processing failed (%s: %s); quantizing the exported graph as it is",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return src


def _reader(feeds: list[Feeds]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        """Hands ``quantize_static`` one calibration batch per call (None at the end)."""

        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> Feeds | None:
            return next(self._it, None)

        def __len__(self) -> int:
            return len(feeds)

    return FeedsReader()


def _types(cfg: QuantizeConfig) -> tuple[Any, Any, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantType

    qt = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]
    return qt[cfg.activation_type], qt[cfg.weight_type], method


def quantize_ort(float_path: Path, out_path: Path, feeds: list[Feeds], cfg: QuantizeConfig,
                 exclude_nodes: list[str] = (), cache: Path | None = None) -> Path:
    """Write the QDQ int8 model of ``float_path`` (already pre-processed) to ``out_path``.

    Args:
        float_path: the float ONNX model.
        out_path: where the int8 model goes.
        feeds: calibration batches (input name -> array).
        cfg: the quantization options (types, per-channel, reduce_range, calibration method).
        exclude_nodes: ONNX node names left in float.
        cache: a calibration-range cache file (ONNX Runtime >= 1.32): written by the first call, read by the next
            ones, so a sensitivity sweep calibrates once.
    """
    require("onnxruntime")
    from onnxruntime.quantization import QuantFormat, quantize_static

    act, weight, method = _types(cfg)
    kwargs: dict[str, Any] = {}
    if cache is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kwargs["calibration_cache_path"] = str(cache)
    try:
        with _quiet():
            quantize_static(str(float_path), str(out_path), _reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=cfg.per_channel, reduce_range=cfg.reduce_range, activation_type=act,
                            weight_type=weight, nodes_to_exclude=list(exclude_nodes), calibrate_method=method,
                            **kwargs)
    except Exception as e:
        raise ExportError(f"onnxruntime could not quantize {str(float_path)!r}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
    return out_path
