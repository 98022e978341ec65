"""``prunekit train``, ``finetune``, ``eval`` and ``pat``: what they print (the stages are ``prunekit.pipeline``)."""

from __future__ import annotations

import json
import sys
from typing import Any

from prunekit.cli.args import prints
from prunekit.config import Config


@prints("train")
@prints("finetune")
@prints("pat")
def trained_cmd(cfg: Config, m: dict[str, Any]) -> None:
    print(f"wrote {cfg.out}: {score(m)}  MACs {m['macs'] / 1e6:.2f} M  params {m['params'] / 1e3:.1f} K")


def score(m: dict[str, Any]) -> str:
    """The run's test figure: top-1, or mAP50 / mAP50-95 for a detector."""
    if "top1" not in m and "map50_95" in m:
        return f"mAP50 {m['map50']:.3f}  mAP50-95 {m['map50_95']:.3f}"
    return f"top1 {m['top1']:.2f}%"


@prints("eval")
def eval_cmd(cfg: Config, m: dict[str, Any]) -> None:
    json.dump(m, sys.stdout, indent=2)
    print()
