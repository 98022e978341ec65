"""``prunekit profile --baseline DIR --pruned DIR``: params, MACs, FLOPs and latency before/after, per backend, over
two run directories (or two Hugging Face causal LM folders). The measuring is ``prunekit.measure.profile``; this is
the stage around it.

Example::

    prunekit profile --baseline runs/base --pruned runs/pruned --backend eager,onnxruntime --runs 100
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from prunekit import runs
from prunekit._io import atomic_write_json
from prunekit.config import Config, section
from prunekit.errors import ConfigError
from prunekit.measure.latency import check_backends
from prunekit.measure.profile import PROFILE_FILE, LatencyArgs, profile_models
from prunekit.pipeline.commands import register
from prunekit.quantize.config import BACKENDS
from prunekit.quantize.latency import Variant, side_by_side

log = logging.getLogger(__name__)


class ProfileConfig(Config):
    """``prunekit profile``: baseline vs pruned run directory, timed alternately in one run (section ``timing``)."""

    baseline: Path = Field(description="run directory (or Hugging Face causal LM folder) of the baseline model")
    pruned: Path = Field(description="run directory (or Hugging Face causal LM folder) of the pruned model")
    batch_size: int = Field(1, gt=0, description="batch size of the timed calls")
    rounds: int = Field(10, gt=0, description="rounds of alternation between the two models (runs are split "
                                              "evenly over them)")
    layers: bool = Field(True, description="also profile per-layer times (torch eager, CPU) before and after")
    layer_runs: int = Field(5, gt=0, description="forwards profiled for the per-layer table")
    top: int = Field(15, gt=0, description="rows of the per-layer table")
    out: Path | None = Field(None, description=f"where to write {PROFILE_FILE} (default: in the --pruned run "
                                               "directory)")
    seq_len: int = Field(128, ge=2, description="Hugging Face causal LM folders: tokens per timed call (capped at "
                                                "the model's positions)")
    baseline_int8: list[Path] = Field(default_factory=list, description="run directories of `prunekit quantize` "
                                      "(or `finetune --qat`) of --baseline, one per runtime: dense float32 and int8 "
                                      "on ONNX Runtime / OpenVINO side by side (--baseline itself counts when it is "
                                      "one)")
    pruned_int8: list[Path] = Field(default_factory=list, description="the same for --pruned: pruned float32 and "
                                    "int8 on each runtime")
    deploy_batches: list[int] = Field([1, 8], description="batch sizes of the side-by-side deployment timing")
    deploy_runs: int = Field(30, gt=0, description="timed calls per variant and batch size in the side-by-side "
                             "deployment timing")
    timing: LatencyArgs = section(LatencyArgs, "backends, threads, runs")


def check_sources(cfg: ProfileConfig) -> None:
    """Both folders are run directories (the error names the flag), the backends run here (``--backend cuda``
    without CUDA fails before anything is loaded), and the two models take the same inputs."""
    for flag, d in (("--baseline", cfg.baseline), ("--pruned", cfg.pruned)):
        try:
            runs.check_run_dir(d)
        except Exception as e:
            raise type(e)(f"{flag}: {e}") from None
    check_backends(cfg.timing.backend)
    sb, sp = runs.read_spec(cfg.baseline), runs.read_spec(cfg.pruned)
    if sb.input != sp.input:
        raise ConfigError(f"--baseline and --pruned take different inputs ({sb.input} vs {sp.input}); "
                          "profile two versions of the same model")


def write_profile(cfg: Any, p: dict[str, Any]) -> dict[str, Any]:
    """Write ``profile.json`` (``--out``, a file or a folder; default: into ``--pruned``); ``p`` gains ``path``."""
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.pruned) / PROFILE_FILE
    if out.is_dir():
        out = out / PROFILE_FILE
    atomic_write_json(out, p)
    log.info("profile: wrote %s", out)
    p["path"] = str(out)
    return p


@register("profile", ProfileConfig, help="Compare a baseline and a pruned run directory (or Hugging Face LM folder): "
          "params, MACs, FLOPs, latency per backend (timed alternately), per-layer times; writes profile.json",
          takes_from=False, writes_run=False)
def profile_runs(cfg: ProfileConfig) -> dict[str, Any]:
    """Profile ``cfg.baseline`` against ``cfg.pruned`` and write ``profile.json``; returns its content.

    Example:
        >>> profile_runs(ProfileConfig.build({"baseline": "runs/base", "pruned": "runs/pruned"}))
    """
    from prunekit.pipeline.llm import is_hf_folder

    if is_hf_folder(cfg.baseline) or is_hf_folder(cfg.pruned):  # what prune-llm / sparsify write
        from prunekit.pipeline.llm_folders import profile_llm

        return profile_llm(cfg)
    check_sources(cfg)
    baseline, pruned = runs.load_model(cfg.baseline), runs.load_model(cfg.pruned)
    spec = pruned.prunekit_spec
    inputs = runs.example_inputs(spec, cfg.batch_size)
    t = cfg.timing
    p = profile_models(baseline, pruned, inputs, t.backend, t.runs, t.warmup, cfg.rounds, t.threads,
                       cfg.layers, cfg.layer_runs, cfg.top)
    variants = deployment_variants(cfg, baseline, pruned)
    if variants:
        threads = t.threads or 2
        log.info("profile: %d variants side by side (dense / pruned, float32 / int8, %s), batch %s, %d threads",
                 len(variants), ", ".join(dict.fromkeys(v.runtime for v in variants)),
                 ", ".join(map(str, cfg.deploy_batches)), threads)
        rows = side_by_side(variants, lambda b: runs.example_inputs(spec, b), tuple(cfg.deploy_batches),
                            cfg.deploy_runs, min(t.warmup, 5), cfg.rounds, threads)
        p["deployment"] = {"threads": threads, "runs": cfg.deploy_runs, "rows": rows}
    return write_profile(cfg, {"baseline_dir": str(cfg.baseline), "pruned_dir": str(cfg.pruned), "model": spec.name,
                               **p, "config": cfg.to_dict()})


# ----------------------------------------------------------------------------------------------- float and int8
def is_int8_run(d: Path) -> bool:
    """A run directory written by ``prunekit quantize`` or ``finetune --qat`` (float and int8 model files)."""
    m = runs.read_metrics(d) if (Path(d) / runs.METRICS).is_file() else {}
    return m.get("precision") == "int8" and bool(m.get("model_file")) and bool(m.get("float_model_file"))


def int8_runs(flag: str, float_dir: Path, dirs: list[Path]) -> dict[str, Path]:
    """``{runtime: run directory}`` of the int8 runs of ``float_dir`` (``dirs``, and itself when it is one); a
    directory that is no int8 run, was quantized from another model, or repeats a runtime is a ``ConfigError``."""
    found: dict[str, Path] = {}
    own = runs.read_metrics(float_dir)
    for d in ([float_dir] if is_int8_run(float_dir) else []) + [Path(x) for x in dirs]:
        try:
            runs.check_run_dir(d)
        except Exception as e:
            raise type(e)(f"{flag}: {e}") from None
        if not is_int8_run(d):
            raise ConfigError(f"{flag} {str(d)!r} is not an int8 run directory (one written by `prunekit quantize` "
                              "or `prunekit finetune --qat`, with model_file and float_model_file in metrics.json)")
        m = runs.read_metrics(d)
        if own.get("params") is not None and m.get("params") not in (None, own["params"]):
            raise ConfigError(f"{flag} {str(d)!r} holds a model of {m['params']} parameters, its float run "
                              f"{str(float_dir)!r} one of {own['params']}: quantize that model")
        for key in ("model_file", "float_model_file"):
            if not (d / m[key]).is_file():
                raise ConfigError(f"{flag} {str(d)!r}: {m[key]} ({key} in metrics.json) is missing")
        if m["backend"] in found and found[m["backend"]].resolve() != d.resolve():
            raise ConfigError(f"{flag}: two {m['backend']} runs ({str(found[m['backend']])!r}, {str(d)!r}); give "
                              "one per runtime")
        found[m["backend"]] = d
    return found


def deployment_variants(cfg: ProfileConfig, baseline: Any, pruned: Any) -> list[Variant]:
    """Eager float32 (reference), then float32 and int8 on each runtime with an int8 run, dense then pruned; none
    when neither model has an int8 run."""
    sources = {"dense": int8_runs("--baseline-int8", Path(cfg.baseline), cfg.baseline_int8),
               "pruned": int8_runs("--pruned-int8", Path(cfg.pruned), cfg.pruned_int8)}
    if not any(sources.values()):
        return []
    out = [Variant("dense", "eager", "float32", baseline), Variant("pruned", "eager", "float32", pruned)]
    for runtime in BACKENDS:
        for precision in ("float32", "int8"):
            for model, found in sources.items():
                if runtime in found:
                    m = runs.read_metrics(found[runtime])
                    key = "model_file" if precision == "int8" else "float_model_file"
                    out.append(Variant(model, runtime, precision, found[runtime] / m[key]))
    return out
