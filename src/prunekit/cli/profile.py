"""``prunekit profile``: what it prints (the stage is ``prunekit.pipeline.profile``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.measure.profile import format_profile
from prunekit.pipeline.profile import ProfileConfig
from prunekit.quantize.latency import format_side_by_side


@prints("profile")
def profile_cmd(cfg: ProfileConfig, p: dict[str, Any]) -> None:
    print(format_profile(p))
    if p.get("deployment"):
        d = p["deployment"]
        print(f"\ndeployment: dense / pruned, float32 / int8, per runtime ({d['threads']} threads, {d['runs']} timed "
              "calls per variant and batch, timed alternately)")
        print(format_side_by_side(d["rows"]))
    print(f"wrote {p['path']}")
