"""Settings of LLM width pruning, how many units they keep, and what a model's config cannot carry out (refused up
front)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from prunekit.config import Config
from prunekit.errors import ConfigError

from .arch import head_layout
from .criteria import list_criteria

log = logging.getLogger("prunekit.pruning.llm.width")

# reconstruction steps of reconstruct_steps="auto" when attention is pruned: without them half the key-value heads
# cost +80% to +150% perplexity on the grid's models (benchmarks/llm_grid.py), with them +2% to +25%
AUTO_RECONSTRUCT = 200
# criterion="auto": the best mean over the grid's 9 cells (3 models x 3 domains) with lstsq compensation
AUTO_CRITERION = {"mlp": "obs", "heads": "variance"}


class WidthSettings(Config):
    """Settings of LLM width pruning (YAML keys = field names; CLI flags ``--mlp-ratio`` ...). ``*_ratio`` is the
    fraction of units removed, as ``ratio`` is everywhere in prunekit (``mlp_sparsity`` ... are the old names)."""

    renamed = {"mlp_sparsity": "mlp_ratio", "head_sparsity": "head_ratio", "hidden_sparsity": "hidden_ratio"}

    mlp_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of MLP channels removed in every layer")
    head_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of GQA groups (a key-value head with its "
                                 "query heads) removed in every layer")
    criterion: Literal["auto", "variance", "fluctuation", "obs", "magnitude", "wanda", "random"] = Field(
        "auto", description="unit score: auto (obs for MLP channels, variance for GQA groups: the best mean over "
        "benchmarks/llm_grid.py's models and domains), variance (VBP), fluctuation (variance x consumer weight norm, "
        "FLAP), obs (least-squares-aware greedy removal), magnitude, wanda (structured), random")
    compensate: Literal["none", "mean", "lstsq"] = Field("lstsq", description="compensation of down_proj/o_proj")
    ridge: float | Literal["auto"] = Field("auto", description="lstsq ridge relative to mean(diag S_KK), or auto "
                                           "(2-fold cross-validation on the calibration batches)")
    kv_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of key-value heads merged away, every query "
                            "head kept (GQA merge by weighted least squares; prunekit.pruning.llm.kv_merge)")
    hidden_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of hidden (residual-stream) channels "
                                   "removed across every RMSNorm, the embeddings and the LM head, after the MLP / head "
                                   "pruning (llama, mistral, qwen2; see prunekit.pruning.llm.hidden)")
    add_bias: bool = Field(False, description="switch on mlp_bias / attention_bias in a Llama config so that "
                           "compensation fits an intercept (needed by compensate=mean); off: no new bias, the folder "
                           "keeps the architecture runtimes expect")
    reconstruct_steps: int | Literal["auto"] = Field(
        "auto", description="Adam steps fitting each pruned decoder layer to the dense model's output of that layer "
        f"on the calibration text (0: off; auto: {AUTO_RECONSTRUCT} when attention heads are pruned or merged, "
        "else 0; prunekit.pruning.llm.reconstruct)")
    reconstruct_lr: float = Field(0.07, gt=0, description="learning rate of the reconstruction steps, relative to "
                                  "each weight matrix's RMS")
    round_to: int = Field(1, ge=1, description="keep a multiple of this many MLP channels")
    sequential: bool = Field(True, description="measure each layer on the model already pruned before it")
    seed: int = Field(0, description="seed of the random criterion (and of prune-llm's calibration sampling)")

    def criterion_for(self, part: str) -> str:
        """The criterion of ``part`` (``"mlp"`` or ``"heads"``), ``auto`` resolved."""
        if self.criterion != "auto":
            return self.criterion
        return AUTO_CRITERION[part]

    def reconstruct(self) -> int:
        """The reconstruction steps ``reconstruct_steps`` stands for (``auto`` resolved)."""
        if self.reconstruct_steps == "auto":
            return AUTO_RECONSTRUCT if self.head_ratio > 0 or self.kv_ratio > 0 else 0
        return self.reconstruct_steps

    @model_validator(mode="after")
    def _something(self) -> WidthSettings:
        if self.reconstruct_steps != "auto" and self.reconstruct_steps < 0:
            raise ValueError(f"reconstruct_steps must be >= 0 or 'auto'; got {self.reconstruct_steps}")
        if self.ridge != "auto" and self.ridge < 0:
            raise ValueError(f"ridge must be >= 0 or 'auto'; got {self.ridge}")
        return self


def kept_count(total: int, sparsity: float, round_to: int = 1) -> int:
    """Units kept of ``total`` at ``sparsity``: ``round(total * (1 - sparsity))`` to a multiple of ``round_to``,
    at least one (``round_to``)."""
    keep = total * (1 - sparsity)
    keep = int(round(keep / round_to)) * round_to
    return max(min(round_to, total), min(total, keep))


def _check_settings(settings: WidthSettings, fam: Any, config: Any) -> None:
    """Refuse settings that would prune nothing or that the model's config cannot express."""
    if not (settings.mlp_ratio or settings.head_ratio or settings.hidden_ratio or settings.kv_ratio):
        raise ConfigError("prune_width: mlp_ratio, head_ratio, kv_ratio and hidden_ratio are all 0, nothing would "
                          "be pruned; set mlp_ratio (e.g. 0.5), head_ratio, kv_ratio and/or hidden_ratio")
    if settings.kv_ratio > 0 and settings.head_ratio > 0:
        raise ConfigError(f"kv_ratio={settings.kv_ratio} and head_ratio={settings.head_ratio}: choose one way to "
                          "shrink the attention (kv_ratio merges key-value heads and keeps every query head; "
                          "head_ratio removes whole groups)")
    if settings.kv_ratio > 0 and fam.attn is None:
        raise ConfigError(f"kv_ratio={settings.kv_ratio}: model_type {config.model_type!r} has no separate "
                          "key-value heads to merge; use kv_ratio=0")
    if settings.hidden_ratio > 0 and fam.attn is None:
        raise ConfigError(f"hidden_ratio={settings.hidden_ratio}: model_type {config.model_type!r} derives "
                          "head_dim from the hidden size, so the hidden size cannot shrink on its own; use "
                          "hidden_ratio=0")
    if settings.hidden_ratio > 0 and kept_count(config.hidden_size, settings.hidden_ratio) >= config.hidden_size:
        raise ConfigError(f"hidden_ratio={settings.hidden_ratio} keeps all {config.hidden_size} hidden "
                          f"channels; the smallest step is {1 / config.hidden_size:.4f}")
    if settings.criterion != "auto" and settings.criterion not in list_criteria():
        raise ConfigError(f"criterion {settings.criterion!r}: valid: auto, {', '.join(list_criteria())}")


def _kept_groups(settings: WidthSettings, fam: Any, config: Any) -> tuple[int, int, int]:
    """(query heads, key-value groups, key-value groups kept); zeros when heads are not pruned."""
    if settings.head_ratio <= 0:
        return 0, 0, 0
    if fam.attn is None:
        raise ConfigError(f"head_ratio={settings.head_ratio}: model_type {config.model_type!r} derives "
                          f"head_dim from the hidden size, so a model with fewer heads cannot be reloaded from its "
                          f"config; use head_ratio=0 (MLP pruning works)")
    nq, nkv, hd = head_layout(config)
    keep_groups = kept_count(nkv, settings.head_ratio)
    if keep_groups == nkv:
        raise ConfigError(f"head_ratio={settings.head_ratio} keeps all {nkv} key-value groups; "
                          f"the smallest step is {1 / nkv:.3f}")
    done = 1 - keep_groups / nkv
    if abs(done - settings.head_ratio) > 1e-9:  # whole GQA groups only: say what it becomes
        log.warning("head_ratio=%s removes whole key-value groups: %d of %d kept, i.e. a head sparsity of "
                    "%.3f", settings.head_ratio, keep_groups, nkv, done)
    return nq, nkv, keep_groups


def _kept_kv(settings: WidthSettings, config: Any) -> int:
    """Key-value heads kept by ``kv_ratio`` (0 when not merging): a divisor of the count, so clusters are equal."""
    if settings.kv_ratio <= 0:
        return 0
    nq, nkv, _ = head_layout(config)
    want = nkv * (1 - settings.kv_ratio)
    ok = [k for k in range(1, nkv) if nkv % k == 0 and nq % k == 0]
    if not ok:
        raise ConfigError(f"kv_ratio={settings.kv_ratio}: the model has {nkv} key-value head(s), none can be "
                          "merged away; use kv_ratio=0")
    keep = min(ok, key=lambda k: (abs(k - want), -k))
    if abs(keep - want) > 1e-9:
        log.warning("kv_ratio=%s: key-value heads merge in equal clusters, %d of %d kept (kv_ratio %.3f)",
                    settings.kv_ratio, keep, nkv, 1 - keep / nkv)
    return keep
