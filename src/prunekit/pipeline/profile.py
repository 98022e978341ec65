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
    return write_profile(cfg, {"baseline_dir": str(cfg.baseline), "pruned_dir": str(cfg.pruned), "model": spec.name,
                               **p, "config": cfg.to_dict()})
