"""``prunekit profile --baseline DIR --pruned DIR``: params, MACs, FLOPs and latency before/after, per backend."""

from __future__ import annotations

from prunekit.cli.args import command
from prunekit.measure.profile import ProfileConfig, format_profile, profile_runs
from prunekit.pipeline.llm import is_hf_folder


@command("profile", ProfileConfig, help="Compare a baseline and a pruned run directory (or Hugging Face LM folder): "
                                        "params, MACs, FLOPs, latency per backend (timed alternately), per-layer "
                                        "times; writes profile.json")
def run(cfg: ProfileConfig) -> None:
    if is_hf_folder(cfg.baseline) or is_hf_folder(cfg.pruned):  # what prune-llm / sparsify write
        from prunekit.pipeline.llm_folders import profile_llm

        p = profile_llm(cfg)
    else:
        p = profile_runs(cfg)
    print(format_profile(p))
    print(f"wrote {p['path']}")
