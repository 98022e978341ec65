"""``prunekit prune-llm`` and ``prunekit eval --text``: width / depth pruning and perplexity of Hugging Face causal LMs.

A model folder is what ``save_pretrained`` writes (``config.json`` + ``*.safetensors``, a tokenizer optional).
Text is tokenized by the folder's tokenizer, or as UTF-8 bytes for a byte-level model (``vocab_size`` 256).

Example::

    prunekit prune-llm --from llama_dir --calib-text train.txt --mlp-ratio 0.5 --criterion variance \\
        --compensate lstsq --eval-text test.txt --out pruned_dir
    prunekit prune-llm --from llama_dir --calib-text train.txt --drop-layers 4 --out shallow_dir   # depth
    prunekit prune-llm --from llama_dir --calib-text train.txt --target-params 0.7 --kd-steps 100 --out small_dir
    prunekit eval --from pruned_dir --text test.txt --seq-len 256

The output folder holds the pruned model (reload it with ``AutoModelForCausalLM.from_pretrained``), the tokenizer
files copied from ``--from``, ``prune_report.json`` (settings, widths, per-layer compensation records; with
``--drop-layers`` / ``--layers-ratio`` a ``depth`` entry: the layer scores and the dropped layers, removed before the
width pruning) and
``metrics.json`` (perplexities before/after when ``--eval-text`` is given, params, the tokenizer used).
A folder without tokenizer files is read as UTF-8 bytes only when its vocabulary is 256 (or with ``--tokenizer
bytes``); any other vocabulary needs ``--tokenizer FOLDER``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from prunekit.config import Config, section
from prunekit.errors import ConfigError, DataNotFoundError, RunDirError
from prunekit.pipeline import llm_kd
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import prepare_out, refuse_same_folder
from prunekit.pruning.llm.depth import DepthConfig, prune_depth
from prunekit.pruning.llm.search import TargetConfig, prune_to_params
from prunekit.pruning.llm.stream_io import StreamConfig
from prunekit.pruning.llm.width import WidthSettings, prune_width, save_pruned
from prunekit.train.lm_kd import LMKDConfig

log = logging.getLogger("prunekit.prune_llm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "vocab.txt")


def is_hf_folder(p: str | Path) -> bool:
    p = Path(p)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_causal_lm(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in float32, eval mode, with a clear error for a bad folder."""
    if not is_hf_folder(path):
        raise DataNotFoundError(f"--from {str(path)!r}: not a Hugging Face model folder (needs config.json "
                                f"and *.safetensors, as save_pretrained writes)")
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        raise ConfigError(f"--from {str(path)!r}: its config.json cannot be read: {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError(f"--from {str(path)!r} holds {', '.join(archs)}, not a causal (decoder) LM: these "
                          "commands load it with AutoModelForCausalLM, which would swap its head; for an encoder "
                          "(BERT-style) use the Python API (prunekit.prune on the model, or prunekit.create_model"
                          "('hf:PATH'))")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except ValueError as e:
        raise ConfigError(f"--from {str(path)!r}: not a causal LM that transformers can load: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged safetensors file raises its own error types
        raise RunDirError(f"--from {str(path)!r}: its weights cannot be loaded ({type(e).__name__}: "
                          f"{str(e)[:300]}); the files may be damaged") from None
    return model.to(device).eval()


def vocab_size(model: torch.nn.Module) -> int:
    """The vocabulary of a Hugging Face LM (``config.vocab_size``) or of a prunekit text model (its input spec)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    spec = getattr(model, "prunekit_spec", None)
    return int((spec.input if spec is not None else {}).get("vocab_size", 0) or 0)


def resolve_tokenizer(model_dir: str | Path, model: torch.nn.Module, tokenizer: str = "auto") -> str:
    """Which tokenizer reads the text: ``"bytes"`` or a tokenizer folder (recorded in metrics.json as ``tokenizer``).

    ``auto`` is the model folder's tokenizer, else bytes for a vocab-256 model; a folder without tokenizer files and
    another vocabulary is an error naming ``--tokenizer`` (reading it as bytes would score nonsense silently)."""
    vocab = vocab_size(model)
    if tokenizer == "auto":
        if any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES):
            return str(model_dir)
        if vocab != 256:
            raise ConfigError(f"--tokenizer auto: {str(model_dir)!r} has no tokenizer files and its vocab_size is "
                              f"{vocab}, not 256 (a byte-level model); pass --tokenizer FOLDER (a folder with the "
                              "tokenizer files), or --tokenizer bytes to read the text as UTF-8 bytes anyway "
                              "(valid: auto, bytes, a tokenizer folder)")
        return "bytes"
    if tokenizer == "bytes" and vocab < 256:
        raise ConfigError(f"--tokenizer bytes: the model's vocab_size is {vocab}, a byte model needs >= 256; "
                          f"put the tokenizer files in {str(model_dir)!r} or pass --tokenizer FOLDER")
    return tokenizer


def tokenize_file(path: str | Path, model_dir: str | Path, model: torch.nn.Module,
                  tokenizer: str = "auto") -> torch.Tensor:
    """The token ids of a text file (1-D long tensor), read by ``resolve_tokenizer``'s choice."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"text file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataNotFoundError(f"text file {str(p)!r} is empty: calibration and perplexity need text")
    src = resolve_tokenizer(model_dir, model, tokenizer)
    if src == "bytes":
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ConfigError(f"--tokenizer {src!r}: cannot load a tokenizer ({type(e).__name__}: {e}); pass a local "
                          f"tokenizer folder or --tokenizer bytes") from None
    return torch.tensor(tok(raw.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)


class PruneLLMConfig(Config):
    """``prunekit prune-llm``: width and/or depth pruning of a Hugging Face causal LM folder (Llama, Mistral, Qwen2,
    GPT-2). Sections ``width`` (``WidthConfig``) and ``depth`` (``DepthConfig``); flags are their flat keys."""

    renamed = WidthSettings.renamed
    shared_keys = ("seed",)

    from_dir: Path = Field(alias="from", description="Hugging Face causal LM folder (config.json + safetensors)")
    model: Path | None = Field(None, description="deprecated: the old name of --from")
    out: Path = Field(Path("runs/prune-llm"), description="output model folder")
    overwrite: bool = Field(False, description="replace --out if it already holds files")
    calib_text: Path = Field(description="calibration text file (training text, not the evaluation text)")
    calib_samples: int = Field(64, gt=0, description="random windows of --seq-len tokens drawn from --calib-text")
    seq_len: int = Field(256, ge=2, description="tokens per calibration / evaluation window")
    eval_text: Path | None = Field(None, description="report perplexity before and after on this text file")
    tokenizer: str = Field("auto", description="auto (the model folder's, else bytes), bytes, or a tokenizer folder")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    seed: int = Field(0, description="seed of the calibration sampling and of the random criterion")
    width: WidthSettings = section(WidthSettings, "width pruning")
    depth: DepthConfig = section(DepthConfig, "depth pruning")
    target: TargetConfig = section(TargetConfig, "one size target solved across the widths and depth")
    kd: LMKDConfig = section(LMKDConfig, "KD recovery from the dense model after pruning")
    stream: StreamConfig = section(StreamConfig, "one decoder layer at a time from the shards (llm_stream.py)")

    @model_validator(mode="after")
    def _target_alone(self) -> PruneLLMConfig:
        self.target.refuse_explicit(self.width, self.depth)
        return self

    @model_validator(mode="before")
    @classmethod
    def _model_is_from(cls, values: Any) -> Any:
        """``--model`` (the old flag) still works, with a warning; every other command takes ``--from``."""
        if not isinstance(values, dict) or values.get("model") is None:
            return values
        values = dict(values)
        old, new = values.pop("model"), values.get("from", values.get("from_dir"))
        if new is not None and Path(new) != Path(old):
            raise ValueError(f"--model {str(old)!r} and --from {str(new)!r}: give --from only (--model is its "
                             "deprecated old name)")
        log.warning("prune-llm: --model is deprecated, use --from %s (as every other command does)", old)
        values.setdefault("from", old)
        return values

    def width_settings(self) -> WidthSettings | None:
        """The width settings, or ``None`` when no width ratio is set."""
        w = self.width
        return w if w.mlp_ratio or w.head_ratio or w.hidden_ratio or w.kv_ratio else None

    def depth_settings(self) -> DepthConfig | None:
        """The depth settings, or ``None`` when no layer is to be removed."""
        d = self.depth
        return d if d.drop_layers or d.layers_ratio else None


def calibration_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random windows (seeded) of ``seq_len`` tokens, (n, seq_len)."""
    if len(tokens) <= seq_len:
        raise ConfigError(f"--calib-text has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=g).tolist()
    return torch.stack([tokens[s:s + seq_len] for s in starts])


@register("prune-llm", PruneLLMConfig, help="Width / depth pruning of a Hugging Face causal LM folder (MLP channels, "
          "GQA groups, hidden size, whole layers; VBP + compensation)")
def prune_llm_run(cfg: PruneLLMConfig) -> dict[str, Any]:
    """Prune the causal LM folder ``cfg.from_dir`` into the model folder ``cfg.out`` (depth first, then width);
    returns its metrics."""
    from prunekit.measure.perplexity import perplexity

    width, depth = cfg.width_settings(), cfg.depth_settings()
    target = cfg.target.target_params
    if width is None and depth is None and target is None:
        raise ConfigError("prune-llm: nothing would be pruned; set --mlp-ratio (e.g. 0.5), --head-ratio, "
                          "--kv-ratio, --hidden-ratio, --drop-layers (e.g. 2) / --layers-ratio, or --target-params")
    refuse_same_folder(cfg.out, cfg.from_dir, what="the --from folder")
    if cfg.stream.stream:
        from prunekit.pipeline.llm_stream import prune_llm_stream

        return prune_llm_stream(cfg)
    if llm_kd.resuming(cfg):
        return llm_kd.resume(cfg)
    out = prepare_out(cfg)  # before hours of pruning
    model = load_causal_lm(cfg.from_dir, cfg.device)
    calib = calibration_windows(tokenize_file(cfg.calib_text, cfg.from_dir, model, cfg.tokenizer),
                                cfg.calib_samples, cfg.seq_len, cfg.seed)
    ev = tokenize_file(cfg.eval_text, cfg.from_dir, model, cfg.tokenizer) if cfg.eval_text else None
    metrics: dict[str, Any] = {"stage": "prune-llm", "from": str(cfg.from_dir),
                               "tokenizer": resolve_tokenizer(cfg.from_dir, model, cfg.tokenizer)}
    if ev is not None:
        metrics["ppl_before"] = perplexity(model, ev, seq_len=cfg.seq_len)
        log.info("perplexity before: %.4f", metrics["ppl_before"])
    report = (_prune(model, calib, width, depth) if target is None else
              prune_to_params(model, calib, target, width=cfg.width, depth=cfg.depth, **cfg.target.options()))
    if ev is not None:
        metrics["ppl_after"] = perplexity(model, ev, seq_len=cfg.seq_len)
        log.info("perplexity after: %.4f", metrics["ppl_after"])
    metrics.update(params_before=report["params_before"], params_after=report["params_after"])
    save_pruned(model, out, report)
    for f in TOKENIZER_FILES:
        if (Path(cfg.from_dir) / f).exists():
            shutil.copy2(Path(cfg.from_dir) / f, out / f)
    if cfg.kd.kd_steps:
        return llm_kd.recover(cfg, model, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _prune(model: torch.nn.Module, calib: torch.Tensor, width: WidthSettings | None,
           depth: DepthConfig | None) -> dict[str, Any]:
    """Depth pruning (layer scores on the dense model), then width pruning; one report (the width report with a
    ``depth`` entry, or the depth report's params)."""
    report: dict[str, Any] = {}
    if depth is not None:
        d = prune_depth(model, calib, depth)
        report = {"depth": d, "params_before": d["params_before"], "params_after": d["params_after"]}
    if width is not None:
        w = prune_width(model, calib, width)
        report = w | report | {"params_after": w["params_after"]}
    return report


def text_perplexity(from_dir: str | Path, text: str | Path, *, seq_len: int = 256, batch_size: int = 8,
                    tokenizer: str = "auto", device: str = "cpu", max_batches: int | None = None) -> dict[str, Any]:
    """Perplexity of a model folder (or prunekit run directory whose model maps ids to logits) on a text file."""
    from prunekit import runs
    from prunekit.measure.perplexity import nll_sum

    if is_hf_folder(from_dir):
        model = load_causal_lm(from_dir, device)
    else:
        runs.check_run_dir(from_dir)
        spec = runs.read_spec(from_dir)
        if spec.input.get("kind", "image") != "text":
            raise ConfigError(f"--text: --from {str(from_dir)!r} holds {spec.name!r}, a model of "
                              f"{spec.input.get('kind', 'image')} inputs, not a language model; perplexity needs a "
                              "causal LM (a Hugging Face model folder, or a run whose model maps token ids to "
                              "logits); drop --text to measure top-1 on its dataset")
        model = runs.load_model(from_dir, device)
    ids = tokenize_file(text, from_dir, model, tokenizer)
    limit = max_batches * batch_size * seq_len if max_batches else None
    total, count = nll_sum(model, ids, seq_len=seq_len, batch_size=batch_size, max_tokens=limit)
    return {"stage": "eval", "from": str(from_dir), "text": str(text), "perplexity": math.exp(total / count),
            "nll": total / count, "tokens_scored": count, "seq_len": seq_len,
            "tokenizer": resolve_tokenizer(from_dir, model, tokenizer),
            "params": sum(p.numel() for p in model.parameters())}


def text_perplexity_run(cfg: Any) -> dict[str, Any]:
    """``prunekit eval --from DIR --text FILE`` (an ``EvalConfig``); with ``--out`` also writes ``metrics.json``."""
    m = text_perplexity(cfg.from_dir, cfg.text, seq_len=cfg.seq_len, batch_size=cfg.data.batch_size,
                        tokenizer=cfg.tokenizer, device=cfg.device, max_batches=cfg.max_batches)
    if cfg.out is not None:
        out = prepare_out(cfg)
        (out / "metrics.json").write_text(json.dumps(m, indent=1))
    return m
