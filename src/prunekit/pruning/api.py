"""The one entry: ``prunekit.prune(model, example_inputs, config, calib_data=...)`` for every pruning family.

``config`` says which family runs, in the manner of torchao's ``quantize_(model, config)``:

- ``StructuredConfig`` (or nothing, or a criterion name): channels and heads removed on torch-pruning's
  dependency graph, VBP's variance criteria with compensation; returns a ``PruneReport``;
- ``SparsityConfig``: unstructured, N:M, kernel masks (``example_inputs`` picks the first/last layers); returns a
  ``SparsityReport``;
- ``WidthConfig``: decoder-LM width (MLP channels, GQA groups, hidden size); ``calib_data`` is token ids; returns
  the width report (a dict);
- ``DepthConfig``: decoder-LM depth (whole decoder layers by measured importance); ``calib_data`` is token ids;
  returns the depth report (a dict).

Keyword options are the config's flat keys (``ratio=``, ``target_macs=``, ``compensate=``, ``reconstruct_steps=``,
...), generated from the config class: they build the config, or replace fields of the one given.

Every call is a transaction: it succeeds, or the model is exactly as it was (same module objects, bit-identical
state dict) and one typed error (``ConfigError`` for a mistake in the call, ``PruningError`` otherwise) says why.
``atomic=False`` skips the copy this needs (one model's worth of memory) for a model too large to hold twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.pruning.transaction import transaction


def _families() -> dict[type[Config], str]:
    from prunekit.pruning.llm.depth import DepthConfig
    from prunekit.pruning.llm.width import WidthSettings
    from prunekit.pruning.structured.settings import StructuredConfig
    from prunekit.pruning.unstructured.settings import SparsifySettings

    return {StructuredConfig: "structured", SparsifySettings: "sparsity", WidthSettings: "width",
            DepthConfig: "depth"}


def resolve_config(config: Any, options: dict[str, Any]) -> Config:
    """``config`` (a config object, a mapping of flat keys, a criterion name or ``None``) with the keyword
    ``options`` applied, validated once."""
    from prunekit.pruning.structured.settings import StructuredConfig

    if config is None or isinstance(config, str):
        values = {"criterion": config} if isinstance(config, str) else {}
        return StructuredConfig.build({**values, **options}, source="prune()")
    if isinstance(config, dict):
        return StructuredConfig.build({**config, **options}, source="prune()")
    if type(config) not in _families():
        names = ", ".join(c.__name__ for c in _families())
        raise ConfigError(f"prune(): config must be one of {names} (or a criterion name, or None), got "
                          f"{type(config).__name__}")
    return config.updated(options, source="prune()") if options else config


def prune(model: nn.Module, example_inputs: Any = None, config: Any = None, *, calib_data: Iterable | None = None,
          loss_fn: Callable | None = None, device: str | torch.device | None = None, atomic: bool = True,
          **options: Any) -> Any:
    """Prune ``model`` in place with ``config``; on any failure the model is left exactly as it was.

    Args:
        model: any ``nn.Module`` (structured: one torch-pruning can trace; width: a transformers decoder LM).
        example_inputs: a tensor, tuple or dict of tensors the model accepts (structured, sparsity).
        config: ``StructuredConfig`` / ``SparsityConfig`` / ``WidthConfig``, a mapping of flat keys, a criterion
            name (``prune(model, x, "l1", ratio=0.5)``) or ``None`` (structured defaults).
        calib_data: an iterable of batches (tensors, ``(inputs, labels)`` pairs or dicts); width: token ids.
        loss_fn: ``loss_fn(outputs, labels)`` of gradient criteria (default cross-entropy).
        device: where calibration runs (default: the model's device).
        atomic: keep a copy to restore the model on failure (default); ``False`` for a model too large for it.
        **options: the config's flat keys (listed below for ``StructuredConfig``).

    Returns:
        ``PruneReport`` (structured), ``SparsityReport`` (sparsity) or the width report (a dict).

    Example:
        >>> report = prunekit.prune(model, torch.randn(1, 3, 32, 32), criterion="l1", target_macs=0.5,
        ...                         calib_data=[torch.randn(16, 3, 32, 32) for _ in range(4)])
        >>> cfg = prunekit.StructuredConfig(criterion="variance", target=prunekit.Target(macs=0.5))
        >>> report = prunekit.prune(model, x, cfg, calib_data=loader)
    """
    cfg = resolve_config(config, options)
    family = _families()[type(cfg)]
    with transaction(model, f"prune() ({family})", enabled=atomic):
        if family == "structured":
            from prunekit.pruning.structured.engine import prune_with_settings

            return prune_with_settings(model, example_inputs, cfg, calib_data=calib_data, loss_fn=loss_fn,
                                       device=device)
        if family == "sparsity":
            from prunekit.pruning.unstructured.sparsifier import sparsify

            given = {k: v for k, v in cfg.model_dump().items() if v != type(cfg).model_fields[k].get_default(
                call_default_factory=True)}  # the options set, not every default (nm of a non-N:M method)
            return sparsify(model, example_inputs=example_inputs, calib_data=calib_data, loss_fn=loss_fn,
                            device=device, **given)
        from prunekit.pruning.llm.depth import prune_depth
        from prunekit.pruning.llm.width import prune_width

        if calib_data is None:
            raise ConfigError(f"prune() with a {type(cfg).__name__} needs calib_data: token ids, a (N, T) tensor or "
                              "a list of (B, T) batches of training text")
        return prune_depth(model, calib_data, cfg) if family == "depth" else prune_width(model, calib_data, cfg)


def _shortcut_docs() -> str:
    """The keyword options' docs, generated from ``StructuredConfig`` (never a hand-kept copy)."""
    from prunekit.pruning.structured.settings import StructuredConfig

    lines = ["", "    Keyword options of a structured call (``StructuredConfig``'s flat keys):", ""]
    for key, (path, field) in StructuredConfig.flat_fields().items():
        lines.append(f"    - ``{key}`` (``{'.'.join(path)}``): {field.description or ''}")
    return "\n".join(lines) + "\n"


prune.__doc__ = (prune.__doc__ or "") + _shortcut_docs()
