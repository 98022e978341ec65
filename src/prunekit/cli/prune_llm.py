"""``prunekit prune-llm``: what it prints (the stage is ``prunekit.pipeline.llm``)."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import prints
from prunekit.pipeline.llm import PruneLLMConfig


@prints("prune-llm")
def prune_llm_cmd(cfg: PruneLLMConfig, m: dict[str, Any]) -> None:
    ppl = (f"  perplexity {m['ppl_before']:.3f} -> {m['ppl_after']:.3f}" if "ppl_after" in m else "")
    ppl += f" -> {m['ppl_after_kd']:.3f} after KD" if "ppl_after_kd" in m else ""
    print(f"wrote {cfg.out}: params {m['params_before'] / 1e6:.2f} M -> {m['params_after'] / 1e6:.2f} M{ppl}")
