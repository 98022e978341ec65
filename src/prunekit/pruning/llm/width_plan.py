"""How many units a width setting keeps, and the settings a model's config cannot carry out (refused up front)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prunekit.errors import ConfigError

from .arch import head_layout
from .criteria import list_criteria

if TYPE_CHECKING:
    from .width import WidthSettings

log = logging.getLogger("prunekit.pruning.llm.width")


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
    if settings.criterion not in list_criteria():
        raise ConfigError(f"criterion {settings.criterion!r}: valid: {', '.join(list_criteria())}")


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
