"""Run a float or int8 model file on batches: ONNX Runtime for ``.onnx``, OpenVINO for ``.xml``; top-1 / top-5
accuracy on a loader, and the output error of an int8 model against its float one.

Example:
    >>> run = load_runner("out/model_int8.onnx", threads=2)
    >>> accuracy(run, test_loader)   # {'top1': 97.2, 'top5': 99.9, 'samples': 360}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import ConfigError, ExportError
from prunekit.quantize.extras import require
from prunekit.quantize.graph import Feeds, to_feeds

Runner = Callable[[Feeds], list[np.ndarray]]


class OrtRunner:
    """``runner(feeds) -> [outputs]`` over an ONNX Runtime CPU session."""

    def __init__(self, path: str | Path, threads: int | None = None):
        require("onnxruntime")
        from prunekit.export.onnx import ort_session

        self.session = ort_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class OvRunner:
    """``runner(feeds) -> [outputs]`` over an OpenVINO model compiled for the CPU (float32 inference precision,
    so a float model is timed and judged in float32, not in bf16 on CPUs that have it)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ov = require("openvino")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:
            raise ExportError(f"openvino cannot load {str(path)!r}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def __call__(self, feeds: Feeds) -> list[np.ndarray]:
        result = self.request.infer([feeds[n] for n in self.input_names])
        return [result[o] for o in self.compiled.outputs]


def load_runner(path: str | Path, threads: int | None = None) -> OrtRunner | OvRunner:
    """The runner of a model file: ``.onnx`` on ONNX Runtime, ``.xml`` (OpenVINO IR) on OpenVINO."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"model file {str(p)!r} does not exist")
    if p.suffix == ".onnx":
        return OrtRunner(p, threads)
    if p.suffix == ".xml":
        return OvRunner(p, threads)
    raise ConfigError(f"cannot run {str(p)!r}: a quantized model is a .onnx (onnxruntime) or .xml (openvino) file")


def accuracy(runner: Runner, loader: Iterable, max_batches: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of ``runner``'s first output (logits ``(B, classes)``) on labelled
    batches; a batch without labels is a ``ConfigError``."""
    names = list(getattr(runner, "input_names", ["input"]))
    correct1 = correct5 = n = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list, dict)) or (isinstance(batch, dict) and "labels" not in batch):
            raise ConfigError("eval_data: accuracy needs labelled batches, (inputs, labels) pairs")
        labels = torch.as_tensor(batch["labels"] if isinstance(batch, dict) else batch[1])
        logits = torch.from_numpy(np.asarray(runner(to_feeds(batch, names, "eval_data"))[0])).float()  # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(labels.cpu()[:, None])
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        n += int(labels.shape[0])
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "samples": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "samples": n}


def output_error(reference: Runner, candidate: Runner, feeds: list[Feeds]) -> dict[str, float]:
    """How far ``candidate``'s first output is from ``reference``'s on ``feeds``: the largest absolute difference
    and the relative error ``||a - b||^2 / ||a||^2`` (0: identical)."""
    max_abs, num, den = 0.0, 0.0, 0.0
    for f in feeds:
        a = np.asarray(reference(f)[0], dtype=np.float64)
        b = np.asarray(candidate(f)[0], dtype=np.float64)
        max_abs = max(max_abs, float(np.abs(a - b).max()))
        num += float(((a - b) ** 2).sum())
        den += float((a ** 2).sum())
    return {"max_abs_diff": max_abs, "rel_error": num / den if den > 0 else float("nan")}
