"""``prunekit prune-llm``: the CLI wrapper of ``prunekit.pipeline.llm``."""

from __future__ import annotations

from prunekit.cli.args import command
from prunekit.pipeline.llm import PruneLLMConfig, prune_llm_run


@command("prune-llm", PruneLLMConfig,
         help="Width pruning of a Hugging Face causal LM folder (MLP channels, GQA groups; VBP + compensation)")
def prune_llm_cmd(cfg: PruneLLMConfig) -> None:
    m = prune_llm_run(cfg)
    ppl = (f"  perplexity {m['ppl_before']:.3f} -> {m['ppl_after']:.3f}" if "ppl_after" in m else "")
    print(f"wrote {cfg.out}: params {m['params_before'] / 1e6:.2f} M -> {m['params_after'] / 1e6:.2f} M{ppl}")
