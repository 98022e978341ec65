"""``prunekit quantize``: static post-training int8 of a run directory's model for a CPU runtime.

Example::

    prunekit quantize --from runs/pruned --backend onnxruntime --out runs/pruned-int8
    prunekit quantize --from runs/pruned --backend openvino --calib-batches 16 --keep-float-worst 2 --out runs/ov

The activation ranges come from the run's ``calib`` split, accuracy from its ``test`` split, measured on the runtime
for the float model and for the int8 model alike. The output is a run directory like every stage's: the float model
(``model.safetensors`` + ``model.json``, so ``report`` / ``profile`` / a later stage read it), the runtime's files
(``model.onnx`` + ``model_int8.onnx``, or the OpenVINO IR ``model.xml`` / ``model_int8.xml`` and their ``.bin``),
``quantize.json`` (the ``QuantizeReport``), ``metrics.json`` (``top1`` is the int8 model's, ``top1_float`` the float
model's on the same runtime; ``latency`` float32 and int8 on that runtime, timed alternately at batch 1),
``config.yaml`` and ``log.txt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from prunekit import runs
from prunekit.config import Config
from prunekit.data import DataArgs
from prunekit.measure import count_macs, count_params
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pipeline.stages import loaders
from prunekit.quantize import QuantizeConfig, QuantizeReport, quantize
from prunekit.quantize.extras import require_backend
from prunekit.quantize.latency import file_call, paired_times, round_spread

log = logging.getLogger("prunekit.quantize")


class QuantizeStageConfig(Config):
    """``prunekit quantize``: the stage's own options, the quantization section (``QuantizeConfig``: ``--backend``,
    ``--calib-batches``, ``--keep-float`` ...) and the data section (``--dataset``, ``--batch-size`` ...)."""

    from_dir: Path = Field(alias="from", description="run directory of the (pruned) model to quantize")
    out: Path = Field(Path("runs/quantize"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    seed: int = Field(0, description="random seed (the order of the calibration batches)")
    eval_batches: int | None = Field(None, gt=0, description="test batches for the accuracy (default: all)")
    latency_runs: int = Field(30, ge=0, description="timed batch-1 calls per model (float32 and int8, alternately) "
                              "for metrics.json; 0: no latency")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="the quantization")
    data: DataArgs = Field(default_factory=DataArgs, description="the data (calibration and test)")


@register("quantize", QuantizeStageConfig, help="Static int8 (post-training) of a run directory's model for ONNX "
          "Runtime or OpenVINO; accuracy of float and int8 on the test split", stage="quantize")
def quantize_run(cfg: QuantizeStageConfig) -> dict[str, Any]:
    """Quantize ``cfg.from_dir``'s model into the run directory ``cfg.out``; returns the metrics written.

    Example:
        >>> quantize_run(QuantizeStageConfig.build({"from": "runs/pruned", "backend": "openvino", "out": "runs/q"}))
    """
    q = cfg.quantize
    require_backend(q.backend)  # before any folder is prepared
    with stage_run(cfg, "quantize") as run:
        model, spec, before = run.model.to("cpu").eval(), run.spec, run.before
        x = runs.example_inputs(spec, 1, "cpu")
        ld = loaders(run.data, cfg.data.batch_size, cfg.seed, cfg.data.workers, cfg.data.download,
                     splits=("calib", "test"))
        log.info("quantize: %s from %s (top1 %.2f%%) for %s, %d calibration batches", spec.name, cfg.from_dir,
                 before.get("top1", float("nan")), q.backend, q.calib_batches)
        report = quantize(model, x, q, calib_data=ld["calib"], out=run.out, eval_data=ld["test"],
                          eval_batches=cfg.eval_batches)
        latency = _latency(report, x, q, cfg.latency_runs)
        metrics = _metrics(cfg, report, latency, before, count_macs(model, x), count_params(model), run.data)
        log.info("quantize: done: top1 %.2f%% int8, %.2f%% float (%s), %.2f MB -> %.2f MB", metrics["top1"],
                 metrics["top1_float"], q.backend, report.float_bytes / 1e6, report.int8_bytes / 1e6)
        runs.save_model(run.out, model, spec)
        runs.write_config(run.out, {**cfg.to_dict(), **run.data})
        runs.write_metrics(run.out, metrics)
    return metrics


def _latency(report: QuantizeReport, x: Any, q: QuantizeConfig, n: int) -> dict[str, Any]:
    """Float32 and int8 on the backend, batch 1, ``q.threads`` threads, timed alternately (empty when ``n`` = 0)."""
    if n <= 0:
        return {}
    fns = {f"{q.backend}_int8": file_call(report.int8_path, x, q.threads),
           f"{q.backend}_float32": file_call(report.float_path, x, q.threads)}
    stats = paired_times(fns, batch_size=1, runs=n, warmup=3, rounds=min(10, n), threads=q.threads,
                         backend=q.backend)
    out = {}
    for name, s in stats.items():
        lo, hi = round_spread(s)
        out[name] = {**s.to_dict(with_times=False), "round_min_ms": lo, "round_max_ms": hi}
        log.info("quantize: latency %s: median %.3f ms (rounds %.3f-%.3f)", name, s.median_ms, lo, hi)
    return out


def _metrics(cfg: QuantizeStageConfig, report: QuantizeReport, latency: dict[str, Any], before: dict[str, Any],
             macs: int, params: int, data: dict[str, Any]) -> dict[str, Any]:
    q, acc, acc_f = cfg.quantize, report.accuracy_int8 or {}, report.accuracy_float or {}
    speedup = None
    if latency:
        speedup = latency[f"{q.backend}_float32"]["median_ms"] / latency[f"{q.backend}_int8"]["median_ms"]
    return {"top1": acc.get("top1"), "top5": acc.get("top5"), "test_samples": acc.get("samples"),
            "top1_float": acc_f.get("top1"), "top5_float": acc_f.get("top5"),
            "top1_int8_drop": (acc_f["top1"] - acc["top1"]) if acc and acc_f else None,
            "top1_before": before.get("top1"), "macs": macs, "params": params, "backend": q.backend,
            "precision": "int8", "model_file": Path(report.int8_path).name,
            "float_model_file": Path(report.float_path).name, "bytes_float": report.float_bytes,
            "bytes_int8": report.int8_bytes, "rel_error": report.rel_error, "max_abs_diff": report.max_abs_diff,
            "layers": report.layers, "kept_float": report.kept_float, "calib_samples": report.calib_samples,
            "latency": latency, "int8_speedup": speedup, "quantize_seconds": report.seconds,
            "stage": "quantize", "from": str(cfg.from_dir), **data}


# ----------------------------------------------------------------------------------------------- finetune --qat
def qat_finetune(cfg: Any) -> dict[str, Any]:
    """``prunekit finetune --qat``: fake-quantized fine-tuning of ``cfg.from_dir``'s model, distilled from its float
    model, then exported int8 for ``cfg.qat.backend`` into ``cfg.out`` as ``prunekit quantize`` writes it.

    The run directory holds the fine-tuned float model (weights on their int8 grid), the runtime's float and int8
    files and ``quantize.json``; ``metrics.json`` holds, all on the test split and the runtime: ``top1`` (the QAT
    int8 model), ``top1_float`` (its float export), ``top1_start_float`` and ``top1_ptq`` (the source model in float
    and after post-training int8 alone), and the fake-quantized torch model's ``top1_fake_quant``.
    """
    import copy
    import tempfile

    from prunekit.pipeline.stages import kd_setup, loaders, model_metrics, split_record, test_metrics, val_metrics
    from prunekit.train import fit
    from prunekit.train.kd import make_kd_loss
    from prunekit.train.qat import calibrate_qat, convert_qat, prepare_qat, qat_layers

    t, d, qa = cfg.train, cfg.data, cfg.qat
    q = QuantizeConfig(backend=qa.backend, calib_batches=qa.calib_batches, threads=2)
    require_backend(q.backend)
    with stage_run(cfg, "finetune", resumable=True) as run:
        out, model, spec, before = run.out, run.model, run.spec, run.before
        ld = loaders(run.data, d.batch_size, t.seed, d.workers, d.download, splits=("train", "val", "test", "calib"))
        x = runs.example_inputs(spec, 1, "cpu")
        float_model = copy.deepcopy(model).to("cpu").eval()
        with tempfile.TemporaryDirectory(prefix="prunekit-ptq-") as tmp:  # the anchor: post-training int8 alone
            ptq = quantize(float_model, x, q, calib_data=ld["calib"], out=tmp, eval_data=ld["test"])
        loss_fn, teacher_dir = kd_setup(cfg, "finetune --qat")
        if loss_fn is None:  # no --kd: distil from the float model being quantized
            loss_fn = make_kd_loss(copy.deepcopy(float_model).to(t.device), cfg.kd.alpha, cfg.kd.temperature,
                                   t.label_smoothing)
        log.info("finetune --qat: %s from %s: post-training %s int8 top1 %.2f%% (float %.2f%%); fake int8 in %d "
                 "layers (%s scheme), %d epochs, lr %g, KD from %s", spec.name, cfg.from_dir, q.backend,
                 ptq.accuracy_int8["top1"], ptq.accuracy_float["top1"], len(qat_layers(model)), qa.scheme, t.epochs,
                 t.lr, teacher_dir or "the float model")
        prepare_qat(model, qa.momentum, scheme=qa.scheme)
        calibrate_qat(model, ld["calib"], qa.calib_batches, t.device)
        start = test_metrics(model, ld["test"], t.device)
        best = fit(model, ld["train"], ld["val"], t, run_dir=out, resume=cfg.resume, phase="qat", loss_fn=loss_fn,
                   start_candidate=True)
        fake = test_metrics(model, ld["test"], t.device)
        convert_qat(model).to("cpu").eval()
        report = quantize(model, x, q, calib_data=ld["calib"], out=out, eval_data=ld["test"])
        metrics = {**_qat_metrics(report, ptq, start, fake), **val_metrics(best), **model_metrics(model, spec),
                   "best_epoch": best.get("epoch"), "kept_start": bool(best.get("kept_start")),
                   "top1_before": before.get("top1"), "stage": "finetune", "qat": True, "from": str(cfg.from_dir),
                   **({"teacher": str(teacher_dir)} if teacher_dir else {}), **run.data,
                   "splits": split_record(run.data, ld)}
        log.info("finetune --qat: done: %s int8 top1 %.2f%% (post-training int8 %.2f%%, float %.2f%%)", q.backend,
                 metrics["top1"], metrics["top1_ptq"], metrics["top1_start_float"])
        runs.save_model(out, model, spec)
        runs.write_config(out, {**cfg.to_dict(), **run.data})
        runs.write_metrics(out, metrics)
    return metrics


def _qat_metrics(report: QuantizeReport, ptq: QuantizeReport, start: dict[str, Any],
                 fake: dict[str, Any]) -> dict[str, Any]:
    """The accuracy figures of a QAT run (test split): QAT int8 and float on the runtime, the source's float and
    post-training int8 on the same runtime, the fake-quantized torch model before and after training."""
    acc, acc_f = report.accuracy_int8 or {}, report.accuracy_float or {}
    ptq_i, ptq_f = ptq.accuracy_int8 or {}, ptq.accuracy_float or {}
    return {"top1": acc.get("top1"), "top5": acc.get("top5"), "test_samples": acc.get("samples"),
            "test_loss": fake["test_loss"], "top1_float": acc_f.get("top1"), "top1_start_float": ptq_f.get("top1"),
            "top1_ptq": ptq_i.get("top1"), "top1_qat_gain": acc["top1"] - ptq_i["top1"] if acc and ptq_i else None,
            "top1_int8_drop": ptq_f["top1"] - acc["top1"] if acc and ptq_f else None,
            "top1_fake_quant_start": start["top1"], "top1_fake_quant": fake["top1"], "backend": report.backend,
            "precision": "int8", "model_file": Path(report.int8_path).name,
            "float_model_file": Path(report.float_path).name, "bytes_float": report.float_bytes,
            "bytes_int8": report.int8_bytes, "rel_error": report.rel_error, "rel_error_ptq": ptq.rel_error,
            "kept_float": report.kept_float, "calib_samples": report.calib_samples}
