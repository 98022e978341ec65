"""The one entry: ``prunekit.quantize(model, example_inputs, config, calib_data=..., out=DIR)``.

The model is exported to float ONNX with the project's exporter, then quantized to int8 for the runtime that will
run it (``QuantizeConfig.backend``): ONNX Runtime's static quantizer (QDQ, per-channel weights) or OpenVINO through
NNCF. What ``out`` holds afterwards:

- onnxruntime: ``model.onnx`` (float) and ``model_int8.onnx``;
- openvino: ``model.onnx``, ``model.xml`` / ``model.bin`` (float IR) and ``model_int8.xml`` / ``model_int8.bin``;
- ``quantize.json``: the ``QuantizeReport`` (paths, sizes, output error, accuracy, sensitivity, config).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit._io import atomic_write_json
from prunekit.errors import ConfigError
from prunekit.quantize.config import QuantizeConfig
from prunekit.quantize.extras import require_backend
from prunekit.quantize.graph import (
    Layer,
    calibration_feeds,
    check_float,
    check_int8,
    export_float,
    layers,
    load_onnx,
    match_layers,
    samples,
)
from prunekit.quantize.runner import accuracy, load_runner, output_error

log = logging.getLogger("prunekit.quantize")
REPORT = "quantize.json"
FILES = {"onnxruntime": ("model.onnx", "model_int8.onnx"), "openvino": ("model.xml", "model_int8.xml")}


@dataclass
class QuantizeReport:
    """What ``quantize`` made: the files, their sizes, how far int8 is from float, and the accuracy of both."""

    backend: str
    float_path: str
    int8_path: str
    float_bytes: int
    int8_bytes: int
    calib_batches: int
    calib_samples: int
    layers: int  # quantizable layers of the float graph
    kept_float: list[str]  # layers left in float (keep_float, then the worst by sensitivity)
    max_abs_diff: float  # int8 vs float on the calibration batches (first output)
    rel_error: float  # ||int8 - float||^2 / ||float||^2 there
    accuracy_float: dict[str, float] | None = None
    accuracy_int8: dict[str, float] | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # worst first
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.float_bytes if self.float_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.size_ratio}

    def summary(self) -> str:
        acc = ""
        if self.accuracy_float and self.accuracy_int8:
            acc = f", top1 {self.accuracy_float['top1']:.2f}% -> {self.accuracy_int8['top1']:.2f}%"
        return (f"{self.backend} int8: {self.int8_bytes / 1e6:.2f} MB ({self.float_bytes / 1e6:.2f} MB float), "
                f"output error {self.rel_error:.2e}{acc}, {len(self.kept_float)} of {self.layers} layers in float")


def resolve_config(config: Any, options: dict[str, Any]) -> QuantizeConfig:
    """``config`` (a ``QuantizeConfig``, a mapping of keys, a backend name or ``None``) with ``options`` applied."""
    if config is None or isinstance(config, str):
        values = {"backend": config} if isinstance(config, str) else {}
        return QuantizeConfig.build({**values, **options}, source="quantize()")
    if isinstance(config, dict):
        return QuantizeConfig.build({**config, **options}, source="quantize()")
    if not isinstance(config, QuantizeConfig):
        raise ConfigError(f"quantize(): config must be a QuantizeConfig, a mapping, a backend name "
                          f"(onnxruntime, openvino) or None, got {type(config).__name__}")
    return config.updated(options, source="quantize()") if options else config


def quantize(model: nn.Module | str | Path, example_inputs: Any = None, config: Any = None, *,
             calib_data: Iterable | None = None, out: str | Path, eval_data: Iterable | None = None,
             eval_batches: int | None = None, **options: Any) -> QuantizeReport:
    """Static post-training int8 of ``model`` for a CPU runtime; files in ``out``, returns a ``QuantizeReport``.

    Args:
        model: an ``nn.Module`` (exported to float ONNX first), or the path of a float ``.onnx`` file.
        example_inputs: a tensor, tuple or dict of tensors the model takes (a module only).
        config: ``QuantizeConfig``, a mapping of its keys, a backend name or ``None`` (ONNX Runtime defaults).
        calib_data: batches (tensors, ``(inputs, labels)`` pairs or dicts); the first ``calib_batches`` are used.
        out: the folder the float and int8 models and ``quantize.json`` go to.
        eval_data: labelled batches: top-1 / top-5 of float and int8 on the same runtime (optional).
        eval_batches: at most this many eval batches (default: all).
        **options: ``QuantizeConfig`` fields (``backend=``, ``calib_batches=``, ``keep_float=`` ...).

    Example:
        >>> report = prunekit.quantize(model, torch.randn(1, 3, 32, 32), backend="onnxruntime",
        ...                            calib_data=calib_loader, out="out/int8", eval_data=test_loader)
        >>> report.accuracy_float["top1"], report.accuracy_int8["top1"], report.int8_path
    """
    cfg = resolve_config(config, options)
    require_backend(cfg.backend)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    float_onnx = out / "model.onnx"
    if isinstance(model, (str, Path)):
        source = load_onnx(model, "quantize(): model")
        check_float(source, model)
        if Path(model).resolve() != float_onnx.resolve():
            float_onnx.write_bytes(source.SerializeToString())
    elif isinstance(model, nn.Module):
        log.info("quantize: exporting the float model to %s", float_onnx)
        export_float(model, example_inputs, float_onnx, cfg.opset)
    else:
        raise ConfigError(f"quantize(): model must be an nn.Module or the path of a float .onnx file, got "
                          f"{type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="prunekit-quantize-") as tmp:
        report = _quantize_file(float_onnx, cfg, calib_data, out, Path(tmp))
    if eval_data is not None:
        report.accuracy_float = accuracy(load_runner(report.float_path, cfg.threads), eval_data, eval_batches)
        report.accuracy_int8 = accuracy(load_runner(report.int8_path, cfg.threads), eval_data, eval_batches)
    report.seconds = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / REPORT, report.to_dict())
    log.info("quantize: %s", report.summary())
    return report


def _quantize_file(float_onnx: Path, cfg: QuantizeConfig, calib_data: Iterable | None, out: Path,
                   tmp: Path) -> QuantizeReport:
    """Calibrate, rank the layers if asked, quantize, check the result; the report without accuracy."""
    if cfg.backend == "onnxruntime":
        from prunekit.quantize.ort import preprocess

        graph_path = preprocess(float_onnx, tmp / "prep.onnx")
    else:
        graph_path = float_onnx
    graph = load_onnx(graph_path, "the float model")
    inits = {i.name for i in graph.graph.initializer}
    feeds = calibration_feeds(calib_data, [i.name for i in graph.graph.input if i.name not in inits],
                              cfg.calib_batches)
    all_layers = layers(graph)
    kept = match_layers(all_layers, cfg.keep_float)
    ranking: list[dict[str, Any]] = []
    if cfg.measures_sensitivity:
        kept, ranking = _with_worst(graph_path, feeds, cfg, all_layers, kept, tmp)
    if len(kept) == len(all_layers) and all_layers:
        raise ConfigError(f"keep_float {cfg.keep_float!r} (with keep_float_worst {cfg.keep_float_worst}) leaves "
                          f"all {len(all_layers)} quantizable layers in float: nothing would be int8")
    float_name, int8_name = FILES[cfg.backend]
    nodes = [la.node for la in kept]
    if cfg.backend == "onnxruntime":
        from prunekit.quantize.ort import quantize_ort

        int8 = quantize_ort(graph_path, out / int8_name, feeds, cfg, nodes)
        check_int8(load_onnx(int8, "the int8 model"), int8, cfg.keep_float)
        float_files, int8_files = [float_onnx], [int8]
    else:
        from prunekit.quantize.ov import fake_quantize_ops, quantize_ov

        int8 = quantize_ov(float_onnx, out / int8_name, feeds, cfg, nodes, out / float_name)
        if not fake_quantize_ops(int8):
            raise ConfigError(f"{str(int8)!r} holds no int8 op: NNCF left the model float only")
        float_files = [out / float_name, (out / float_name).with_suffix(".bin")]
        int8_files = [int8, int8.with_suffix(".bin")]
    float_path = float_onnx if cfg.backend == "onnxruntime" else out / float_name
    err = output_error(load_runner(float_path, cfg.threads), load_runner(int8, cfg.threads), feeds)
    return QuantizeReport(
        backend=cfg.backend, float_path=str(float_path), int8_path=str(int8),
        float_bytes=sum(p.stat().st_size for p in float_files), int8_bytes=sum(p.stat().st_size for p in int8_files),
        calib_batches=len(feeds), calib_samples=samples(feeds), layers=len(all_layers),
        kept_float=[la.name for la in kept], max_abs_diff=err["max_abs_diff"], rel_error=err["rel_error"],
        sensitivity=ranking, config=cfg.to_dict())


def _with_worst(graph_path: Path, feeds: list, cfg: QuantizeConfig, all_layers: list[Layer], kept: list[Layer],
                tmp: Path) -> tuple[list[Layer], list[dict[str, Any]]]:
    """Rank the layers not yet kept in float (on ``cfg.backend``); add the ``keep_float_worst`` worst to ``kept``."""
    from prunekit.quantize.sensitivity import layer_sensitivity, trials

    candidates = [la for la in all_layers if la not in kept]
    reference, trial = trials(cfg.backend, graph_path, feeds, cfg, tmp)
    base, rows = layer_sensitivity(reference, trial, feeds, candidates, [la.node for la in kept])
    worst = rows[: cfg.keep_float_worst]
    if worst:
        log.info("quantize: leaving the %d layers int8 hurts most in float: %s", len(worst),
                 ", ".join(f"{r.layer} ({100 * r.gain:.0f}%)" for r in worst))
    by_node = {la.node: la for la in all_layers}
    return kept + [by_node[r.node] for r in worst], [{**r.to_dict(), "rel_error_all_int8": base} for r in rows]
