"""``prune-llm --kd-steps N``: a short KD recovery of the pruned model, resumable in its ``--out`` folder.

After pruning, ``prune-llm`` writes the pruned model folder (``config.json``, safetensors, ``prune_report.json``,
tokenizer files), then distils the dense ``--from`` model into it (:func:`prunekit.train.lm_kd.lm_distill`) on
windows of ``--train-text`` (default: ``--calib-text``), checkpointing into ``--out/kd_checkpoint/``. The folder is
rewritten with the distilled weights and ``metrics.json`` (``ppl_before``, ``ppl_after`` = after pruning,
``ppl_after_kd``; the KL to the teacher on the calibration windows before and after KD), and the checkpoint folder
is removed. A rerun with the same ``--out`` (and the same settings) while ``kd_checkpoint/state.json`` is there
loads the pruned model from ``--out`` and continues from the last checkpoint instead of pruning again.

Example::

    prunekit prune-llm --from llama_dir --calib-text train.txt --target-params 0.7 --kd-steps 100 \\
        --eval-text test.txt --out pruned_dir        # killed at step 60? the same command continues at step 50
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from prunekit.train.lm_kd import kl_to_teacher, lm_distill, read_state

log = logging.getLogger("prunekit.prune_llm")
KD_DIR = "kd_checkpoint"
_FREE = ("out", "overwrite", "device")  # settings that may change between a run and its resumption


def resuming(cfg: Any) -> bool:
    """Whether ``cfg.out`` holds an unfinished KD run of ``prune-llm`` to continue."""
    out = Path(cfg.out)
    return (cfg.kd.kd_steps > 0 and not cfg.overwrite and (out / KD_DIR / "state.json").is_file()
            and not (out / "metrics.json").exists())


def _fingerprint(cfg: Any) -> dict[str, Any]:
    d = {k: v for k, v in cfg.to_dict().items() if k not in _FREE}
    return json.loads(json.dumps(d, default=str))


def resume(cfg: Any) -> dict[str, Any]:
    """Continue the KD run in ``cfg.out``: the pruned model from the folder, the metrics so far from the
    checkpoint; returns the final metrics."""
    from prunekit.pipeline.llm import load_causal_lm

    state = read_state(Path(cfg.out) / KD_DIR) or {}
    log.info("prune-llm: %s holds an unfinished KD run (step %s); continuing it", cfg.out, state.get("step"))
    student = load_causal_lm(cfg.out, cfg.device)
    return recover(cfg, student, dict((state.get("meta") or {}).get("metrics") or {}))


def recover(cfg: Any, student: torch.nn.Module, metrics: dict[str, Any]) -> dict[str, Any]:
    """Distil ``cfg.from_dir`` into ``student`` (saved in ``cfg.out`` already), rewrite the folder with the
    result and ``metrics.json``; returns the metrics."""
    from prunekit.measure.perplexity import perplexity
    from prunekit.pipeline.llm import calibration_windows, load_causal_lm, tokenize_file
    from prunekit.pruning.llm.width import save_pruned

    out = Path(cfg.out)
    teacher = load_causal_lm(cfg.from_dir, cfg.device)
    calib_ids = tokenize_file(cfg.calib_text, cfg.from_dir, teacher, cfg.tokenizer)
    train = tokenize_file(cfg.kd.train_text, cfg.from_dir, teacher, cfg.tokenizer) if cfg.kd.train_text else calib_ids
    calib = calibration_windows(calib_ids, cfg.calib_samples, cfg.seq_len, cfg.seed)
    if "kd_kl_before" not in metrics:  # a resumed run has it from the checkpoint, measured before any step
        metrics = {**metrics, "kd_kl_before": kl_to_teacher(student, teacher, calib)}
    res = lm_distill(student, teacher, train, cfg.kd, seq_len=cfg.seq_len, seed=cfg.seed, ckpt_dir=out / KD_DIR,
                     meta={"metrics": metrics}, fingerprint=_fingerprint(cfg))
    metrics = {**metrics, **res, "kd_kl_after": kl_to_teacher(student, teacher, calib)}
    log.info("KD: KL to the dense model on the calibration windows %.4f -> %.4f", metrics["kd_kl_before"],
             metrics["kd_kl_after"])
    if cfg.eval_text:
        ev = tokenize_file(cfg.eval_text, cfg.from_dir, teacher, cfg.tokenizer)
        metrics["ppl_after_kd"] = perplexity(student, ev, seq_len=cfg.seq_len)
        log.info("perplexity after KD: %.4f", metrics["ppl_after_kd"])
    save_pruned(student, out)  # prune_report.json stays as pruning wrote it
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(out / KD_DIR, ignore_errors=True)
    return metrics
