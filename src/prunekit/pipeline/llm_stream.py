"""``prunekit prune-llm --stream`` and ``prunekit sparsify --stream``: a causal LM folder pruned one decoder layer
at a time from its safetensors shards (memory bounded by one layer; ``prunekit.pruning.llm.stream*``).

The model is never loaded whole, so what needs it whole is refused with the flag to drop: ``--eval-text``
(measure afterwards with ``prunekit eval --from OUT --text FILE``), ``--kd-steps``, ``--target-params``,
``--hidden-ratio``, ``--depth-criterion loss``. ``--dtype`` sets the dtype layers are read, run and written in,
``--device`` where they run. Depth and width together: depth first (into a temporary folder inside ``--out``,
removed after), then width, as without ``--stream``.

Example::

    prunekit prune-llm --from llama_dir --calib-text train.txt --mlp-ratio 0.5 --stream --dtype bfloat16 --out p
    prunekit sparsify --from llama_dir --method sparsegpt --sparsity 0.5 --calib-text train.txt --stream --out s
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from prunekit._io import atomic_write_json
from prunekit.errors import ConfigError, DataNotFoundError
from prunekit.pipeline.skeleton import prepare_out

log = logging.getLogger("prunekit.stream")


def _config_only(from_dir: Path) -> Any:
    """What tokenizing needs of the model (its config), without loading a weight."""
    from transformers import AutoConfig

    from prunekit.pipeline.llm import is_hf_folder

    if not is_hf_folder(from_dir):
        raise DataNotFoundError(f"--from {str(from_dir)!r}: not a Hugging Face model folder (needs config.json "
                                "and *.safetensors, as save_pretrained writes)")
    try:
        return SimpleNamespace(config=AutoConfig.from_pretrained(str(from_dir)))
    except (ValueError, OSError) as e:
        raise ConfigError(f"--from {str(from_dir)!r}: its config.json cannot be read: {e}") from None


def _calibration(cfg: Any, model: Any) -> tuple[torch.Tensor, str]:
    """The calibration windows ``(N, T)`` and the tokenizer used."""
    from prunekit.pipeline.llm import calibration_windows, resolve_tokenizer, tokenize_file

    ids = tokenize_file(cfg.calib_text, cfg.from_dir, model, cfg.tokenizer)
    return (calibration_windows(ids, cfg.calib_samples, cfg.seq_len, cfg.seed),
            resolve_tokenizer(cfg.from_dir, model, cfg.tokenizer))


def _refuse(cfg: Any, what: dict[str, bool]) -> None:
    """A ``ConfigError`` naming the first flag set in ``what`` that streaming cannot do."""
    bad = [flag for flag, on in what.items() if on]
    if bad:
        raise ConfigError(f"--stream cannot do {bad[0]}: it needs the whole model in memory (streaming holds one "
                          f"decoder layer); drop {bad[0].split()[0]} or --stream"
                          + ("; measure afterwards with prunekit eval --from OUT --text FILE"
                             if bad[0].startswith("--eval-text") else ""))


def _copy_tokenizer(from_dir: Path, out: Path) -> None:
    from prunekit.pipeline.llm import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        if (Path(from_dir) / f).exists():
            shutil.copy2(Path(from_dir) / f, out / f)


def prune_llm_stream(cfg: Any) -> dict[str, Any]:
    """``prune-llm --stream`` (a ``PruneLLMConfig``): depth then width, one layer at a time; returns the metrics."""
    from prunekit.pruning.llm.stream import prune_width_streaming
    from prunekit.pruning.llm.stream_depth import prune_depth_streaming

    width, depth = cfg.width_settings(), cfg.depth_settings()
    _refuse(cfg, {"--eval-text": cfg.eval_text is not None, "--kd-steps": bool(cfg.kd.kd_steps),
                  "--target-params": cfg.target.target_params is not None,
                  "--hidden-ratio (every RMSNorm at once)": bool(width and width.hidden_ratio),
                  "--depth-criterion loss (a forward pass per layer)": bool(
                      depth and depth.depth_criterion == "loss")})
    out = prepare_out(cfg)
    calib, tokenizer = _calibration(cfg, _config_only(cfg.from_dir))
    opts = {"dtype": cfg.stream.torch_dtype(), "device": cfg.device}
    src, report = Path(cfg.from_dir), {}
    if depth is not None:
        tmp = out / ".depth-stream" if width is not None else out
        d = prune_depth_streaming(src, tmp, calib, depth, **opts)
        report = {"depth": d, "params_before": d["params_before"], "params_after": d["params_after"]}
        src = tmp
    if width is not None:
        w = prune_width_streaming(src, out, calib, width, **opts)
        report = w | report | {"params_after": _params(out)}
        report.setdefault("params_before", _params(Path(cfg.from_dir)))
        if depth is not None:
            shutil.rmtree(src)
    (out / "prune_report.json").write_text(json.dumps(report, indent=1))
    _copy_tokenizer(cfg.from_dir, out)
    metrics = {"stage": "prune-llm", "from": str(cfg.from_dir), "tokenizer": tokenizer, "stream": True,
               "dtype": cfg.stream.dtype, "params_before": report["params_before"],
               "params_after": report["params_after"], "max_resident_layers": max(
                   r.get("max_resident_layers", 0) for r in (report, report.get("depth", {})))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _params(folder: Path) -> int:
    """Parameters of a model folder, counted from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            total += sum(_numel(h.get_slice(k).get_shape()) for k in h.keys())
    return total


def _nonzero(folder: Path) -> int:
    """Non-zero parameters of a model folder, read one tensor at a time."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            total += sum(int(torch.count_nonzero(h.get_tensor(k))) for k in h.keys())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def sparsify_llm_stream(cfg: Any) -> dict[str, Any]:
    """``sparsify --stream`` on a causal LM folder (a ``SparsifyConfig`` that passed ``check_llm_config``)."""
    import yaml

    from prunekit.pipeline.llm_sparse import REPORT
    from prunekit.pruning.llm.stream_sparse import sparsify_streaming

    s = cfg.sparsify
    _refuse(cfg, {"--eval-text": cfg.eval_text is not None,
                  "--nm-fallback pad": s.structure == "nm" and s.nm_fallback == "pad"})
    out = prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    calib, tokenizer = _calibration(cfg, _config_only(cfg.from_dir))
    nm = s.nm_pair if s.structure == "nm" else None
    rep = sparsify_streaming(cfg.from_dir, out, calib, s.method, sparsity=None if nm else s.target(), nm=nm,
                             only=s.only, ignore=s.ignore, dtype=cfg.stream.torch_dtype(), device=cfg.train.device,
                             batch_size=cfg.data.batch_size)
    _copy_tokenizer(cfg.from_dir, out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_json(out / REPORT, {**rep, "stream": True, "dtype": cfg.stream.dtype})
    metrics = {"stage": "sparsify", "from": str(cfg.from_dir), "calib_tokens": calib.numel(), "tokenizer": tokenizer,
               "stream": True, "dtype": cfg.stream.dtype, "sparsify_seconds": round(rep["seconds"], 2),
               "sparsity": rep["sparsity"], "method": s.method, "target_sparsity": rep["target"],
               "layers": rep["layers"], "max_resident_layers": rep["max_resident_layers"],
               "params": _params(out), "nonzero_params": _nonzero(out)}
    metrics["model_sparsity"] = 1 - metrics["nonzero_params"] / max(metrics["params"], 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
