"""``hf:<name-or-path>``: Hugging Face image classifiers (ViT, ...) and BERT-style text encoders.

The transformers model is wrapped in :class:`HFModel`, whose ``forward`` returns one tensor (logits, or the
``last_hidden_state`` for ``task="feature-extraction"``), so the pruning engine, MAC counter and exporters see an
ordinary module. The resolved config is stored in the spec kwargs (``hf_config``) so that a run directory rebuilds
the architecture with ``from_config`` offline, from its name alone.

Example:
    >>> m = prunekit.create_model("hf:/models/minilm", task="feature-extraction", pretrained=True)
    >>> m(input_ids=ids, attention_mask=mask).shape        # (B, T, 384)
    >>> m = prunekit.create_model("hf:tiny-bert", hf_config={"model_type": "bert", "hidden_size": 32, ...},
    ...                           task="sequence-classification", num_classes=2)
"""

from __future__ import annotations

import importlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, DataNotFoundError
from prunekit.models.external import adapt_channels, is_network_error

log = logging.getLogger(__name__)

TASKS = ("auto", "image-classification", "sequence-classification", "feature-extraction")
TEXT_SEQ_LEN = 32


class HFModel(nn.Module):
    """A transformers model whose ``forward`` returns a tensor.

    ``forward(x)`` passes a positional tensor as ``pixel_values`` (vision) or ``input_ids`` (text);
    ``forward(**inputs)`` passes keyword tensors (``input_ids``, ``attention_mask``, ...) through.
    """

    def __init__(self, model: nn.Module, task: str, input_name: str):
        super().__init__()
        self.model = model
        self.task = task
        self.input_name = input_name

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        if x is not None:
            inputs[self.input_name] = x
        out = self.model(**inputs, return_dict=True)
        return out.last_hidden_state if self.task == "feature-extraction" else out.logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("hf: models need the transformers package: pip install 'prunekit[hf]'") from None
    return transformers


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of every config field (what ``hf_config`` stores)."""
    return json.loads(config.to_json_string(use_diff=False))


# id of a pruned model's own config -> the dense config it was copied from (``remember_dense``)
_DENSE: dict[int, dict[str, Any]] = {}


def remember_dense(own: Any, dense: Any) -> None:
    """Record ``dense`` (the config a model was built from) as the dense architecture behind the copy ``own`` that
    pruning changes, so ``save_model`` can record how to rebuild the dense model."""
    _DENSE[id(own)] = config_to_dict(dense)
    weakref.finalize(own, _DENSE.pop, id(own), None)


def is_transformers(model: nn.Module) -> bool:
    """A bare transformers model (not prunekit's ``HFModel`` wrapper) with a serialisable config."""
    return type(model).__module__.startswith("transformers.") and \
        callable(getattr(model.__dict__.get("config"), "to_json_string", None))


def transformers_spec(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``from_config`` kwargs rebuilding the dense ``model``, the config fields pruning changed)."""
    cls, now = type(model), config_to_dict(model.config)
    dense = _DENSE.get(id(model.config), now)
    changed = {k: v for k, v in now.items() if dense.get(k) != v and k != "transformers_version"}
    return {"architecture": f"{cls.__module__}:{cls.__qualname__}", "hf_config": dense}, changed


def from_config(architecture: str, hf_config: dict[str, Any]) -> nn.Module:
    """A transformers model of class ``architecture`` (``"module:Class"``) built from ``hf_config``, random
    weights: what ``save_model`` records for a bare transformers model."""
    module, _, name = architecture.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"architecture {architecture!r}: {type(e).__name__}: {e}") from None
    return cls(config_from_dict(hf_config))


def config_from_dict(d: dict[str, Any]) -> Any:
    tf = _transformers()
    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ConfigError(f"hf_config: needs a 'model_type' key (e.g. 'bert', 'vit'); got keys {sorted(d)[:8]}")
    d.pop("transformers_version", None)
    try:
        return tf.AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ConfigError(f"hf_config: {e}") from None


def _load_config(ref: str) -> Any:
    tf = _transformers()
    local = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) and not local.exists():
        raise ConfigError(f"model 'hf:{ref}': the folder {str(local)!r} does not exist")
    try:
        return tf.AutoConfig.from_pretrained(str(local) if local.exists() else ref)
    except Exception as e:
        if is_network_error(e):
            raise DataNotFoundError(
                f"model 'hf:{ref}': cannot read its config ({type(e).__name__}: {e}). It is not a local folder, and "
                f"fetching it from the Hugging Face Hub needs the network; pass a local folder (hf:/path/to/model) "
                f"or the config itself (hf_config={{...}})") from None
        raise ConfigError(f"model 'hf:{ref}': cannot read its config: {e}") from None


def is_vision(config: Any) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size")


def resolve_task(task: str, config: Any) -> str:
    """``auto``: image-classification for vision configs, sequence-classification when the checkpoint is a
    sequence classifier, else feature-extraction (a plain encoder, e.g. a sentence-embedding model)."""
    if task not in TASKS:
        raise ConfigError(f"task: unknown value {task!r}; valid: {', '.join(TASKS)}")
    if task != "auto":
        return task
    if is_vision(config):
        return "image-classification"
    if any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        return "sequence-classification"
    return "feature-extraction"


def _auto_class(task: str):
    tf = _transformers()
    return {"image-classification": tf.AutoModelForImageClassification,
            "sequence-classification": tf.AutoModelForSequenceClassification,
            "feature-extraction": tf.AutoModel}[task]


def create_hf(ref: str, *, pretrained: bool = False, in_channels: int = 3, num_classes: int = 10,
              task: str = "auto", hf_config: dict[str, Any] | None = None, **kwargs: Any) -> HFModel:
    """Build ``hf:<ref>``: from ``hf_config`` when given (offline), else from the config at ``ref``.

    ``kwargs`` go to ``from_pretrained``/``from_config`` (e.g. ``attn_implementation="eager"``).
    """
    config = config_from_dict(hf_config) if hf_config is not None else _load_config(ref)
    task = resolve_task(task, config)
    vision = is_vision(config)
    if task == "image-classification" and not vision:
        raise ConfigError(f"model 'hf:{ref}': task 'image-classification' needs a vision config "
                          f"(model_type {config.model_type!r} has no image_size/num_channels)")
    if task != "feature-extraction":
        config.num_labels = num_classes
    src_channels = getattr(config, "num_channels", in_channels)
    if vision:
        config.num_channels = in_channels
    cls = _auto_class(task)
    try:
        if pretrained:
            model = _from_pretrained(cls, ref, config, src_channels, in_channels, kwargs)
        else:
            model = cls.from_config(config, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model 'hf:{ref}' (task {task!r}): {e}") from None
    model.float()
    wrapper = HFModel(model, task, "pixel_values" if vision else "input_ids")
    wrapper.train()
    # what an offline rebuild needs (create_model stores it in the spec kwargs via external.input_spec)
    wrapper._prunekit_kwargs = {"task": task, "hf_config": config_to_dict(model.config)}
    return wrapper


def _from_pretrained(cls, ref: str, config: Any, src_channels: int, in_channels: int, kwargs: dict) -> nn.Module:
    local = Path(ref).expanduser()
    source = str(local) if local.exists() else ref
    load_config = config
    if src_channels != in_channels:  # load the RGB checkpoint as is, then adapt its patch/stem conv below
        load_config = type(config).from_dict(config.to_dict())
        load_config.num_channels = src_channels
    try:
        model = cls.from_pretrained(source, config=load_config, ignore_mismatched_sizes=True, dtype=torch.float32,
                                    **kwargs)
    except Exception as e:
        if is_network_error(e):
            raise DataNotFoundError(
                f"--pretrained: could not fetch the weights of 'hf:{ref}' ({type(e).__name__}: {e}). Downloading "
                f"them needs the network; offline, pass a local folder (hf:/path/to/model) or --weights PATH") from None
        raise
    if src_channels == in_channels:
        return model
    new = cls.from_config(config, **kwargs)
    state = model.state_dict()
    for k, v in new.state_dict().items():
        w = state.get(k)
        if w is not None and w.dim() == 4 and w.shape[1] == src_channels and v.shape[1] == in_channels:
            state[k] = adapt_channels(w, in_channels)
            log.info("adapted %s from %d to %d input channels", k, src_channels, in_channels)
    new.load_state_dict(state)
    return new


def hf_input_spec(model: nn.Module) -> dict[str, Any]:
    config = model.config
    if is_vision(config):
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"kind": "image", "shape": [1, int(config.num_channels), int(h), int(w)]}
    seq = min(TEXT_SEQ_LEN, int(getattr(config, "max_position_embeddings", TEXT_SEQ_LEN) or TEXT_SEQ_LEN))
    return {"kind": "text", "seq_len": seq, "vocab_size": int(config.vocab_size)}
