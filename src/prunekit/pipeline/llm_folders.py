"""``prunekit export``, ``profile`` and ``report`` on Hugging Face causal LM folders (what ``prune-llm`` and
``sparsify`` write), beside the run directories those commands take.

A model folder holds ``config.json`` + safetensors (+ tokenizer files) and, when prunekit wrote it, ``metrics.json``.
The model is wrapped so that it maps token ids ``(B, T)`` to logits ``(B, T, V)``: that is what is exported (ONNX
with dynamic batch and sequence axes) and timed.

Example::

    prunekit export --from pruned_llm --verify          # pruned_llm/export/model.onnx
    prunekit profile --baseline llama_dir --pruned pruned_llm --seq-len 128
    prunekit report pruned_llm sparse_llm               # perplexities and params from their metrics.json
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, RunDirError
from prunekit.pipeline.llm import is_hf_folder, load_causal_lm
from prunekit.pipeline.skeleton import prepare_out, refuse_same_folder

log = logging.getLogger("prunekit.llm")
EXPORT_SEQ = 32  # tokens of the traced example; --verify uses more, which tests the dynamic sequence axis


class CausalLMLogits(nn.Module):
    """``input_ids (B, T) -> logits (B, T, V)`` of a transformers causal LM, without the key-value cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def token_ids(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids ``{"input_ids": (batch, T)}``, ``T`` = ``seq_len`` capped at the model's positions."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or seq_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(cfg.vocab_size), (batch, min(seq_len, int(limit))), generator=g)
    return {"input_ids": ids.to(next(model.parameters()).device)}


def export_llm(cfg: Any) -> dict[str, Any]:
    """``prunekit export`` of a model folder (an ``ExportConfig``): into ``--from/export/``, or ``--out`` (a copy of
    the folder's files plus ``export/``). Returns the manifest (``export.json``)."""
    from prunekit._io import atomic_write_json
    from prunekit.export.core import EXPORT_BATCH, ExportOptions
    from prunekit.export.stage import EXPORT_DIR, MANIFEST, check_verified, export_model

    src = Path(cfg.from_dir)
    folder = src
    refuse_same_folder(cfg.out, src, fix=f"leave --out out to export into {str(src / EXPORT_DIR)!r}")
    if cfg.out is not None:
        folder = prepare_out(cfg)
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, folder / f.name)
    model = CausalLMLogits(load_causal_lm(src))
    batch, verify_batch = (EXPORT_BATCH, cfg.verify_batch_size) if cfg.dynamic_batch else (cfg.batch_size,) * 2
    example = token_ids(model.model, batch, EXPORT_SEQ)
    verify = token_ids(model.model, verify_batch, EXPORT_SEQ + 8, seed=1) if cfg.verify else None
    log.info("export: causal LM %s -> %s (%s)", src, folder / EXPORT_DIR, ", ".join(cfg.format))
    options = ExportOptions(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch, onnx_exporter=cfg.onnx_exporter)
    manifest = export_model(model, example, folder / EXPORT_DIR, cfg.format, options, verify, cfg.atol, cfg.rtol,
                            "random token ids")
    manifest.update({"from": str(src), "config": cfg.to_dict(), "outputs": "logits (batch, tokens, vocab)"})
    atomic_write_json(folder / EXPORT_DIR / MANIFEST, manifest)
    check_verified(manifest, cfg.format)
    return manifest


def profile_llm(cfg: Any) -> dict[str, Any]:
    """``prunekit profile`` of two model folders (a ``ProfileConfig``): the same figures as for run directories, on
    random token ids of ``--seq-len``; writes ``profile.json`` (default: into ``--pruned``)."""
    from prunekit.measure.latency import check_backends
    from prunekit.measure.profile import profile_models
    from prunekit.pipeline.profile import write_profile

    for flag, d in (("--baseline", cfg.baseline), ("--pruned", cfg.pruned)):
        if not is_hf_folder(d):
            raise ConfigError(f"{flag} {str(d)!r} is not a Hugging Face model folder while the other one is: profile "
                              "two versions of the same model (two model folders, or two run directories)")
    check_backends(cfg.timing.backend)
    baseline, pruned = CausalLMLogits(load_causal_lm(cfg.baseline)), CausalLMLogits(load_causal_lm(cfg.pruned))
    if baseline.model.config.vocab_size != pruned.model.config.vocab_size:
        raise ConfigError(f"--baseline and --pruned have different vocabularies ({baseline.model.config.vocab_size} "
                          f"vs {pruned.model.config.vocab_size}); profile two versions of the same model")
    inputs = token_ids(pruned.model, cfg.batch_size, cfg.seq_len)
    t = cfg.timing
    p = profile_models(baseline, pruned, inputs, t.backend, t.runs, t.warmup, cfg.rounds, t.threads,
                       cfg.layers, cfg.layer_runs, cfg.top)
    p = {"baseline_dir": str(cfg.baseline), "pruned_dir": str(cfg.pruned),
         "model": pruned.model.config.model_type, "seq_len": inputs["input_ids"].shape[1], **p,
         "config": cfg.to_dict()}
    return write_profile(cfg, p)


REPORT_KEYS = ("stage", "params", "ppl_before", "ppl_after", "perplexity", "sparsity", "tokenizer", "from")


def llm_rows(folders: list[Path]) -> list[dict[str, Any]]:
    """One row per model folder for ``prunekit report``: what its ``metrics.json`` says (a folder prunekit did not
    write has none: its params are counted from the weights' header instead)."""
    rows = []
    for d in folders:
        m: dict[str, Any] = {}
        if (Path(d) / "metrics.json").is_file():
            try:
                m = json.loads((Path(d) / "metrics.json").read_text())
            except json.JSONDecodeError as e:
                raise RunDirError(f"{str(d)!r}: metrics.json is not valid JSON ({e})") from None
        params = m.get("params_after", m.get("params")) or _header_params(Path(d))
        row = {"model folder": str(d), **{k: m.get(k) for k in REPORT_KEYS}, "params": params}
        rows.append(row)
    return rows


def _header_params(folder: Path) -> int:
    """Parameter count of a folder's safetensors files from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - not a dict
                n = 1
                for s in st.get_slice(k).get_shape():
                    n *= s
                total += n
    return total


def llm_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (empty cells where a folder's metrics.json has no such figure)."""
    keys = [k for k in rows[0] if any(r.get(k) is not None for r in rows)]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
