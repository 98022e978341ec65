"""Attributes of known model families, brought in line with the pruned layers (run after every pruning step).

torch-pruning resizes weights; models also keep widths in plain attributes that ``forward``, ``reset_classifier`` or
a saved config read later. Each syncer below reads the real width from a layer and writes the attributes:

``timm``         ``embed_dim`` (from the patch embedding), ``head_hidden_size`` / ``num_features`` (from the
                 classifier's input), timm ``ClassifierHead.in_features``: ``reset_classifier(n)`` builds a head of
                 the pruned width.
``torchvision``  ``VisionTransformer.hidden_dim`` (read by its forward) and ``mlp_dim`` (when every block agrees).
``huggingface``  ``model.config``: ``hidden_size`` (input embeddings), ``intermediate_size`` and
                 ``num_attention_heads`` where every layer agrees (a config holds one value); on the model's own
                 copy of the config, never on the object the caller built the model from.

Example:
    >>> @register_family_sync("mylib")
    ... def _sync_mylib(model): ...
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Callable

from torch import nn

from prunekit.models.hf import remember_dense
from prunekit.registry import Registry

FamilySync = Callable[[nn.Module], None]
FAMILY_SYNCS: Registry[FamilySync] = Registry("family attribute sync")
register_family_sync = FAMILY_SYNCS.register

# Hugging Face MLP hidden layers (the width ``config.intermediate_size`` names), by module name
HF_INTERMEDIATE = re.compile(r"(.*\.)?(intermediate\.dense|mlp\.(gate_proj|up_proj|fc1)|ffn\.lin1)")


def sync_families(model: nn.Module) -> None:
    """Run every registered family syncer on ``model`` (each ignores models not of its family)."""
    for name in FAMILY_SYNCS.names():
        FAMILY_SYNCS.get(name)(model)


def _is_from(m: nn.Module, package: str) -> bool:
    return type(m).__module__.split(".")[0] == package


def _width(m: nn.Module | None) -> int | None:
    """Output width of a patch embedding / norm / linear layer, else ``None``."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    if isinstance(m, nn.LayerNorm) and m.normalized_shape:
        return int(m.normalized_shape[-1])
    return None


@register_family_sync("timm")
def _sync_timm(model: nn.Module) -> None:
    for m in model.modules():
        if not _is_from(m, "timm"):
            continue
        if type(m).__name__ == "ClassifierHead" and isinstance(getattr(m, "fc", None), nn.Linear):
            m.in_features = m.fc.in_features
        if not callable(getattr(m, "get_classifier", None)) or not isinstance(getattr(m, "num_features", None), int):
            continue
        old = {k: getattr(m, k) for k in ("embed_dim", "num_features", "head_hidden_size")
               if isinstance(getattr(m, k, None), int)}
        new: dict[int, int] = {}  # old width -> pruned width
        proj = getattr(getattr(m, "patch_embed", None), "proj", None)
        if "embed_dim" in old and _width(proj):
            new[old["embed_dim"]] = _width(proj)
        head = m.get_classifier()
        fc = head if isinstance(head, nn.Linear) else getattr(head, "fc", None)
        if isinstance(fc, nn.Linear) and type(head).__name__ != "NormMlpClassifierHead":
            new.setdefault(old.get("head_hidden_size", old["num_features"]), fc.in_features)
        for k, v in old.items():
            if v in new:
                setattr(m, k, new[v])


@register_family_sync("torchvision")
def _sync_torchvision(model: nn.Module) -> None:
    for m in model.modules():
        # torchvision ViT reshapes the patch embedding with self.hidden_dim
        if type(m).__name__ != "VisionTransformer" or not isinstance(getattr(m, "conv_proj", None), nn.Conv2d):
            continue
        m.hidden_dim = m.conv_proj.out_channels
        mlp = {b.mlp[0].out_features for b in getattr(m.encoder, "layers", []) if isinstance(b.mlp[0], nn.Linear)}
        if len(mlp) == 1 and isinstance(getattr(m, "mlp_dim", None), int):
            m.mlp_dim = mlp.pop()


_OWN_CONFIGS: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()  # the models' copies


def _own_config(model: nn.Module, cfg: object) -> object:
    """The model's own copy of ``cfg``, put on every module of ``model`` that holds ``cfg``. The caller built the
    model from that config object and may build more from it (a teacher, the dense reference a saved model is
    rebuilt over); pruning changes only the model."""
    if _OWN_CONFIGS.get(id(cfg)) is cfg:
        return cfg  # already the model's copy
    own = copy.deepcopy(cfg)
    _OWN_CONFIGS[id(own)] = own  # not an attribute: a config writes all its attributes to config.json
    remember_dense(own, cfg)  # what save_model rebuilds the dense model from
    for m in model.modules():
        if m.__dict__.get("config") is cfg:
            m.config = own
    return own


@register_family_sync("huggingface")
def _sync_huggingface(model: nn.Module) -> None:
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if not _is_from(m, "transformers") or not callable(getattr(m, "get_input_embeddings", None)) \
                or not callable(getattr(cfg, "to_dict", None)):
            continue
        cfg = _own_config(model, cfg)
        try:
            emb = m.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
        hidden = _width(emb) or _width(getattr(emb, "projection", None))  # token embeddings, or ViT patches
        if hidden and isinstance(getattr(cfg, "hidden_size", None), int):
            cfg.hidden_size = hidden
        _set_uniform(cfg, "intermediate_size", {s.out_features for n, s in m.named_modules()
                                                if HF_INTERMEDIATE.fullmatch(n) and isinstance(s, nn.Linear)})
        _set_uniform(cfg, "num_attention_heads", {s.num_attention_heads for s in m.modules() if s is not m
                                                  and isinstance(getattr(s, "num_attention_heads", None), int)})


def _set_uniform(cfg: object, key: str, values: set[int]) -> None:
    """``cfg.key = v`` when every layer has the same ``v`` (a per-layer width does not fit one config field)."""
    if len(values) == 1 and isinstance(getattr(cfg, key, None), int):
        setattr(cfg, key, values.pop())
