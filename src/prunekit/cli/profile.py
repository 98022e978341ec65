"""``prunekit profile --baseline DIR --pruned DIR``: params, MACs, FLOPs and latency before/after, per backend."""

from __future__ import annotations

from prunekit.cli.args import command
from prunekit.measure.profile import ProfileConfig, format_profile, profile_runs


@command("profile", ProfileConfig, help="Compare a baseline and a pruned run directory: params, MACs, FLOPs, latency "
                                        "per backend (timed alternately), per-layer times; writes profile.json")
def run(cfg: ProfileConfig) -> None:
    p = profile_runs(cfg)
    print(format_profile(p))
    print(f"wrote {p['path']}")
