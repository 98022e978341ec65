"""Depth pruning of decoder-only LMs: whole decoder layers removed, chosen by measured block importance.

Each decoder layer is scored on calibration token ids, on the dense model, by one of:

- ``angular`` (default; ShortGPT's block influence, arXiv 2403.03853, in the angular form of Gromov et al.,
  arXiv 2403.17887): the mean over calibration tokens of ``arccos(cos(h_in, h_out)) / pi`` between the hidden state
  a layer reads and the one it writes. A layer that barely turns the residual stream scores near 0. One forward pass.
- ``loss``: the increase of the mean next-token loss on the calibration ids when that layer alone is skipped
  (its output replaced by its input). One forward pass per layer.

The ``drop_layers`` (or ``round(layers_ratio * L)``) lowest-scoring layers go. The result reloads with plain
``AutoModelForCausalLM.from_pretrained``: the config's ``num_hidden_layers`` is updated, its per-layer lists kept
consistent (``layer_types``; Qwen2's ``max_window_layers`` counts the kept layers below it), and every kept layer's
``layer_idx`` (attention, decoder layer) renumbered ``0..L'-1`` so the KV cache addresses the right slot.

Example:
    >>> report = prune_depth(model, calib_ids, DepthConfig(drop_layers=4))   # model changed in place
    >>> report["dropped"]                                                     # e.g. [21, 22, 24, 25]
    >>> prunekit.prune(model, None, DepthConfig(layers_ratio=0.25), calib_data=calib_ids)   # the same, atomic
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.config import Config
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.transaction import transactional

from .arch import _get, get_family
from .layout import DEPTH_KEYS, config_changes, config_snapshot
from .stats import calibration_batches

log = logging.getLogger(__name__)


class DepthConfig(Config):
    """Settings of LLM depth pruning (YAML keys = field names; CLI flags ``--drop-layers`` ...). Give
    ``drop_layers`` or ``layers_ratio``, not both."""

    drop_layers: int = Field(0, ge=0, description="number of decoder layers removed (the least important)")
    layers_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of decoder layers removed (rounded)")
    depth_criterion: Literal["angular", "loss"] = Field(
        "angular", description="layer importance: angular (distance between a layer's input and output hidden "
        "states, ShortGPT) or loss (calibration loss increase when the layer alone is skipped)")

    @model_validator(mode="after")
    def _one_size(self) -> DepthConfig:
        if self.drop_layers and self.layers_ratio:
            raise ValueError(f"drop_layers={self.drop_layers} and layers_ratio={self.layers_ratio}: give one of them")
        return self

    def count(self, layers: int) -> int:
        """Layers removed from a model of ``layers`` decoder layers."""
        return self.drop_layers or int(round(self.layers_ratio * layers))


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _forward(lm: nn.Module, batches: list[torch.Tensor], loss: bool = False) -> float:
    """Run the calibration batches; the mean next-token loss when ``loss``."""
    device = next(lm.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        b = b.to(device)
        out = lm(input_ids=b, use_cache=False)
        if loss:
            logits = out.logits[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                              reduction="sum")
            total, count = total + float(nll), count + b[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def angular_importance(lm: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> list[float]:
    """Per layer: mean over calibration tokens of ``arccos(cos(h_in, h_out)) / pi`` (0 = the layer is an identity)."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            h_in = _hidden_in(args, kwargs).detach().double().flatten(0, -2)  # (tokens, hidden)
            h_out = _hidden_out(out).detach().double().flatten(0, -2)
            cos = nn.functional.cosine_similarity(h_in, h_out, dim=-1).clamp(-1, 1)
            sums[i] += float(torch.arccos(cos).sum() / math.pi)
            counts[i] += cos.numel()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _forward(lm, batches)
    finally:
        for h in handles:
            h.remove()
    return (sums / counts.clamp_min(1)).tolist()


@torch.no_grad()
def loss_importance(lm: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> list[float]:
    """Per layer: calibration loss with that layer skipped minus the dense calibration loss."""

    def skip(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        h = _hidden_in(args, kwargs)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    base = _forward(lm, batches, loss=True)
    scores = []
    for layer in layers:
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(_forward(lm, batches, loss=True) - base)
        finally:
            handle.remove()
    return scores


def remove_layers(lm: nn.Module, layers_path: str, drop: list[int]) -> None:
    """Remove decoder layers ``drop`` from ``lm`` in place; config and ``layer_idx`` renumbered (see the module)."""
    layers = _get(lm, layers_path)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new  # the KV cache slot this layer reads and writes
    parent, name = layers_path.rsplit(".", 1)
    owner = _get(lm, parent)
    setattr(owner, name, kept)
    config = lm.config
    types = getattr(config, "layer_types", None)
    mwl = getattr(config, "max_window_layers", None)
    config.num_hidden_layers = len(keep)
    if isinstance(types, list | tuple):
        config.layer_types = [types[i] for i in keep]
        if isinstance(getattr(owner, "has_sliding_layers", None), bool):  # Qwen2Model decides its masks by it
            owner.has_sliding_layers = "sliding_attention" in config.layer_types
    if isinstance(mwl, int):
        config.max_window_layers = sum(1 for i in keep if i < mwl)


@transactional("prune_depth()")
def prune_depth(model: nn.Module, calib: torch.Tensor | list[torch.Tensor], settings: DepthConfig | None = None,
                *, batch_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """Remove the least important decoder layers of ``model`` (a transformers causal LM or ``hf:`` wrapper) in place.

    Args:
        model: LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / GPT2LMHeadModel (or ``hf:`` wrapper).
        calib: calibration token ids, a ``(N, T)`` tensor or a list of ``(B, T)`` batches.
        settings: :class:`DepthConfig`; keyword ``overrides`` replace its fields.
        batch_size: batch size when ``calib`` is one tensor.

    Returns:
        A report: layers before/after, the dropped indices, every layer's score, params, config changes, seconds.

    Raises:
        ConfigError: nothing to remove, or every layer.
        PruningError: unsupported model, empty calibration data.
    """
    from .width import unwrap

    settings = DepthConfig.build({**(settings.to_dict() if settings else {}), **overrides}, "prune_depth")
    lm = unwrap(model)
    fam = get_family(lm)
    layers = _get(lm, fam.layers_path)
    n_layers, n_drop = len(layers), settings.count(len(layers))
    if n_drop == 0:
        raise ConfigError(f"prune_depth: drop_layers={settings.drop_layers}, layers_ratio={settings.layers_ratio} "
                          f"remove no layer of {n_layers}; set drop_layers (e.g. 1) or layers_ratio (e.g. 0.25)")
    if n_drop >= n_layers:
        raise ConfigError(f"prune_depth: removing {n_drop} of {n_layers} decoder layers leaves none; drop_layers "
                          f"must be below {n_layers}")
    batches = calibration_batches(calib, batch_size)
    t0, before = time.perf_counter(), config_snapshot(lm.config)
    params_before = sum(p.numel() for p in lm.parameters())
    was = lm.training
    lm.eval()
    try:
        score = angular_importance if settings.depth_criterion == "angular" else loss_importance
        scores = score(lm, layers, batches)
    finally:
        lm.train(was)
    if not all(math.isfinite(s) for s in scores):
        raise PruningError(f"prune_depth: non-finite layer scores {scores}; check the calibration data")
    drop = sorted(torch.sort(torch.tensor(scores, dtype=torch.float64), stable=True).indices[:n_drop].tolist())
    remove_layers(lm, fam.layers_path, drop)
    changes = config_changes(before, lm.config, DEPTH_KEYS, "depth pruning")
    _sync_wrapper(model, lm)
    log.info("depth pruning %s: %d -> %d layers, dropped %s (%s)", lm.config.model_type, n_layers,
             n_layers - n_drop, drop, settings.depth_criterion)
    return {"settings": settings.to_dict(), "model_type": lm.config.model_type, "layers": [n_layers, n_layers - n_drop],
            "dropped": drop, "scores": [round(s, 6) for s in scores], "params_before": params_before,
            "params_after": sum(p.numel() for p in lm.parameters()), "config_changes": changes,
            "calib_tokens": sum(b.numel() for b in batches), "seconds": time.perf_counter() - t0}


def _sync_wrapper(model: nn.Module, lm: nn.Module) -> None:
    """Keep an ``hf:`` wrapper's rebuild spec in step with the pruned config."""
    kw = getattr(model, "_prunekit_kwargs", None)
    if isinstance(kw, dict) and "hf_config" in kw:
        from prunekit.models.hf import config_to_dict

        kw["hf_config"] = config_to_dict(lm.config)
