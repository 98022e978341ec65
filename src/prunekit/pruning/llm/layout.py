"""What a transformers config can express: the guard between a pruned decoder and the folder it is written to.

``AutoModelForCausalLM.from_pretrained`` builds every layer from one config (one ``intermediate_size``, one head
count, the same biases everywhere), so a pruned model reloads only if its tensors are exactly the ones its config
builds. :func:`check_expressible` compares the model with a copy built from its config on the ``meta`` device (no
memory) and refuses, naming the tensor and the reason, a model whose layers the config cannot describe (per-layer
widths, a bias on some layers only, a layer count the config does not say); nothing is written then.

:func:`config_changes` lists the config keys a pruning step changed and refuses any outside the keys it may change
(the widths, the layer count), so a pruned folder keeps the original ``architectures`` and every other key.

Example:
    >>> before = config_snapshot(model.config)
    >>> ...                                               # prune
    >>> config_changes(before, model.config, WIDTH_KEYS)  # {"intermediate_size": [48, 24]}
    >>> check_expressible(model)                          # raises PruningError when the folder would not reload
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError

# config keys width pruning may change (GPT-2's n_inner; head_dim written explicitly once heads or hidden shrink)
WIDTH_KEYS = frozenset({"intermediate_size", "n_inner", "num_attention_heads", "num_key_value_heads", "head_dim",
                        "hidden_size"})
# config keys depth pruning may change (GPT-2's n_layer; Qwen2's per-layer attention types and window boundary)
DEPTH_KEYS = frozenset({"num_hidden_layers", "n_layer", "layer_types", "max_window_layers"})
# bookkeeping keys transformers itself rewrites on save
_IGNORED = frozenset({"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"})


def config_snapshot(config: Any) -> dict[str, Any]:
    """A deep copy of ``config.to_dict()`` to compare with after pruning."""
    return copy.deepcopy(config.to_dict())


def config_changes(before: dict[str, Any], config: Any, allowed: frozenset[str] | set[str],
                   who: str = "pruning") -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for every config key that changed; a change outside ``allowed`` is a ``PruningError``
    (raised inside the pruning transaction, so the model is rolled back)."""
    after = config.to_dict()
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
               if k not in _IGNORED and before.get(k) != after.get(k)}
    unexpected = [k for k in changed if k not in allowed]
    if unexpected:
        k = unexpected[0]
        raise PruningError(f"{who} changed the config key {k!r} ({changed[k][0]!r} -> {changed[k][1]!r}); it may "
                           f"change only {', '.join(sorted(allowed))}, so that the folder keeps the original "
                           "architecture")
    if before.get("architectures") and after.get("architectures") != before["architectures"]:
        raise PruningError(f"{who} changed the config's architectures {before['architectures']} -> "
                           f"{after.get('architectures')}")
    return changed


def _reference_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model ``from_pretrained`` would build from ``model.config`` (on ``meta``)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    try:
        with torch.device("meta"):
            ref = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config transformers rejects is the answer itself
        raise PruningError(f"the pruned config cannot build a model ({type(e).__name__}: {str(e)[:300]}); "
                           "nothing was written") from None
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def check_expressible(model: nn.Module) -> None:
    """Refuse (``PruningError``, with the reason) a model whose tensors its config cannot describe.

    Per-layer widths, biases on some layers only or a layer count other than ``num_hidden_layers`` would be written
    and then fail to reload (or silently reload another model) with ``AutoModelForCausalLM.from_pretrained``."""
    ref = _reference_shapes(model)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in ref if k not in have]
    extra = [k for k in have if k not in ref]
    wrong = [k for k in ref if k in have and have[k] != ref[k]]
    if not (missing or extra or wrong):
        return
    mt = getattr(model.config, "model_type", "?")
    why = (f"transformers builds every {mt} layer from one config (one intermediate_size, one head count, the same "
           "biases in every layer), so this model would not reload with from_pretrained; prune every layer to the "
           "same width (prune_width does) or keep the model in Python")
    if wrong:
        k = wrong[0]
        raise PruningError(f"{k} has shape {list(have[k])} but the config builds {list(ref[k])} "
                           f"({len(wrong)} tensor(s) differ): {why}")
    k = (extra or missing)[0]
    raise PruningError(f"{k} {'exists in the model but not' if extra else 'is missing from the model but is'} in "
                       f"what the config builds ({len(extra)} extra, {len(missing)} missing): {why}")
