"""``prunekit profile``: what it prints (the stage is ``prunekit.pipeline.profile``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.measure.profile import format_profile
from prunekit.pipeline.profile import ProfileConfig


@prints("profile")
def profile_cmd(cfg: ProfileConfig, p: dict[str, Any]) -> None:
    print(format_profile(p))
    print(f"wrote {p['path']}")
