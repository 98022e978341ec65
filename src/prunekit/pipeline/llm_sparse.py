"""``prunekit sparsify`` on a Hugging Face causal LM folder: Wanda / SparseGPT, unstructured or N:M.

``--from`` is a model folder as ``save_pretrained`` writes it (``config.json`` + safetensors; the model format of
``prunekit prune-llm``). The calibration windows come from ``--calib-text`` (training text), tokenized like
``prunekit eval --text`` does (the folder's tokenizer, else bytes for a vocab-256 model; any other vocabulary
without tokenizer files needs ``--tokenizer``; metrics.json records the tokenizer used). The linear layers inside
the decoder blocks are pruned block by block (``prunekit.pruning.llm.sparse``); the zeros are folded into the weights
and ``--out`` is again a model folder, which plain ``AutoModelForCausalLM.from_pretrained`` reloads (mask buffers
are not part of a transformers checkpoint), plus ``sparsity_report.json``, ``metrics.json`` (sparsity, and the
perplexity before / after on ``--eval-text`` when given) and ``config.yaml``.

Example::

    prunekit sparsify --from llama_dir --method sparsegpt --sparsity 0.5 --calib-text train.txt \\
        --eval-text test.txt --out llama_sgpt50
    prunekit sparsify --from llama_dir --method wanda --nm 2:4 --calib-text train.txt --out llama_wanda24
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from prunekit._io import atomic_write_json
from prunekit.errors import ConfigError
from prunekit.pipeline.skeleton import prepare_out, refuse_same_folder

log = logging.getLogger("prunekit.sparsify")
REPORT = "sparsity_report.json"


def check_llm_config(cfg: Any) -> None:
    """What a causal-LM folder allows: the decoder methods, one-shot, no fine-tuning, calibration text."""
    from prunekit.pruning.unstructured import get_method

    method, epochs = cfg.sparsify.method, cfg.train.epochs
    if not get_method(method).layerwise:
        raise ConfigError(f"--from {str(cfg.from_dir)!r} is a Hugging Face causal LM folder: --method must be one of "
                          f"the decoder-LM methods wanda, sparsegpt (got {method!r})")
    if cfg.schedule != "oneshot" or epochs:
        raise ConfigError(f"--from {str(cfg.from_dir)!r} is a causal LM folder: {method} prunes one-shot without "
                          f"fine-tuning here (got --schedule {cfg.schedule}, --epochs {epochs})")
    if cfg.calib_text is None:
        raise ConfigError(f"--method {method} on a causal LM folder needs --calib-text FILE (training text; the "
                          "calibration windows are drawn from it)")


def sparsify_llm_run(cfg: Any) -> dict[str, Any]:
    """Sparsify the causal LM folder ``cfg.from_dir`` into the model folder ``cfg.out`` (a ``SparsifyConfig``)."""
    import torch

    from prunekit.measure.perplexity import perplexity
    from prunekit.pipeline.llm import (
        TOKENIZER_FILES,
        calibration_windows,
        load_causal_lm,
        resolve_tokenizer,
        tokenize_file,
    )
    from prunekit.pruning.unstructured import Sparsifier, fold_masks

    check_llm_config(cfg)
    refuse_same_folder(cfg.out, cfg.from_dir)
    if cfg.stream.stream:  # one decoder layer at a time from the shards
        from prunekit.pipeline.llm_stream import sparsify_llm_stream

        return sparsify_llm_stream(cfg)
    out = prepare_out(cfg)  # before the pruning, not after (no --resume: one-shot)
    torch.manual_seed(cfg.seed)
    device, batch_size = cfg.train.device, cfg.data.batch_size
    model = load_causal_lm(cfg.from_dir, device)
    ids = tokenize_file(cfg.calib_text, cfg.from_dir, model, cfg.tokenizer)
    calib = calibration_windows(ids, cfg.calib_samples, cfg.seq_len, cfg.seed)  # (N, T)
    batches = list(calib.split(batch_size))
    ev = tokenize_file(cfg.eval_text, cfg.from_dir, model, cfg.tokenizer) if cfg.eval_text else None
    metrics: dict[str, Any] = {"stage": "sparsify", "from": str(cfg.from_dir), "calib_tokens": calib.numel(),
                               "tokenizer": resolve_tokenizer(cfg.from_dir, model, cfg.tokenizer)}
    if ev is not None:
        metrics["ppl_before"] = perplexity(model, ev, seq_len=cfg.seq_len, batch_size=batch_size)
        log.info("sparsify: perplexity before %.4f", metrics["ppl_before"])
    settings = cfg.sparsify.model_copy(update={"calib_batches": len(batches)})  # every calibration window is used
    t0 = time.perf_counter()
    sp = Sparsifier(model, settings, example_inputs=calib[:1].to(device), calib_data=batches, device=device)
    sp.step()
    metrics["sparsify_seconds"] = round(time.perf_counter() - t0, 2)
    report = sp.report()
    fold_masks(model)  # a transformers checkpoint has no mask buffers: the zeros are the sparsity
    if ev is not None:
        metrics["ppl_after"] = perplexity(model, ev, seq_len=cfg.seq_len, batch_size=batch_size)
        log.info("sparsify: perplexity after %.4f", metrics["ppl_after"])
    log.info("sparsify: report\n%s", report.table())
    metrics.update(report.metrics())
    metrics["layers"] = {lr.name: lr.sparsity for lr in report.layers}
    model.to("cpu").save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (Path(cfg.from_dir) / f).exists():
            shutil.copy2(Path(cfg.from_dir) / f, out / f)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(out / REPORT, report.to_dict())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
