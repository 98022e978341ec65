"""Models from other libraries: ``tv:<name>`` (torchvision), ``timm:<name>`` and ``hf:<name-or-path>`` (transformers).

Each is built so that ``create_model(name, **spec.kwargs, pretrained=False)`` rebuilds the same architecture offline
(the run directory supplies the weights): heads and first convolutions are adapted the same way with or without
pretrained weights.

Example:
    >>> prunekit.create_model("tv:resnet50", num_classes=100, pretrained=True)   # downloads the weights
    >>> prunekit.create_model("timm:test_vit", in_channels=1, num_classes=10)
    >>> prunekit.create_model("hf:/path/to/minilm", task="feature-extraction", pretrained=True)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, DataNotFoundError, closest

log = logging.getLogger(__name__)

TV_DEFAULT_SIZE = 224
_AUX_HEAD_MODELS = ("googlenet", "inception_v3")
_NETWORK_MODULES = ("urllib", "http", "requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "socket")


def create_external(name: str, *, pretrained: bool | str = False, in_channels: int = 3, num_classes: int = 10,
                    **kwargs: Any) -> nn.Module:
    """Build a ``tv:``, ``timm:``, ``hf:`` or a user's ``module.path:Class`` model (called by
    ``prunekit.create_model``)."""
    from prunekit.models.builtin import check_io

    check_io(name, in_channels, num_classes)
    prefix, _, ref = name.partition(":")
    if not ref:
        raise ConfigError(f"model {name!r}: nothing after {prefix + ':'!r}; e.g. tv:resnet50, timm:resnet18, "
                          f"hf:google/vit-base-patch16-224")
    if prefix == "tv":
        return create_torchvision(ref, pretrained=pretrained, in_channels=in_channels, num_classes=num_classes,
                                  **kwargs)
    if prefix == "timm":
        return create_timm(ref, pretrained=bool(pretrained), in_channels=in_channels, num_classes=num_classes,
                           **kwargs)
    if prefix == "hf":
        from prunekit.models.hf import create_hf

        return create_hf(ref, pretrained=bool(pretrained), in_channels=in_channels, num_classes=num_classes, **kwargs)
    return create_user(name, in_channels=in_channels, num_classes=num_classes, **kwargs)


def create_user(path: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``module.path:ClassOrFunction``: a user's own model, imported (from ``PYTHONPATH``) and called with ``kwargs``
    (``--model-kwargs``), plus ``in_channels`` / ``num_classes`` where its signature names them."""
    import inspect

    from prunekit.registry import import_object

    module_name = path.partition(":")[0]
    valid = ("valid: a built-in name, tv:NAME, timm:NAME, hf:NAME_OR_PATH, or module.path:ClassOrFunction "
             "importable from PYTHONPATH (your own model)")
    try:
        obj: Any = import_object(path)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model {path!r}: unknown prefix {module_name + ':'!r} and not an importable model "
                          f"({type(e).__name__}: {e}); {valid}") from None
    if not callable(obj):
        raise ConfigError(f"model {path!r}: {type(obj).__name__} is not callable; {valid}")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if key in params or takes_any:
            kwargs.setdefault(key, value)
    try:
        model = obj(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {path!r}: bad constructor argument ({e}); pass them with --model-kwargs "
                          "KEY=V,...") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {path!r} returned {type(model).__name__}, not an nn.Module")
    return model


# ----------------------------------------------------------------------------------------------- helpers
def is_network_error(e: BaseException) -> bool:
    """True when ``e`` (or its cause) looks like a failed download (no network, host unreachable, not cached)."""
    seen = 0
    while e is not None and seen < 8:
        root = type(e).__module__.split(".")[0]
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or root in _NETWORK_MODULES:
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def offline_error(name: str, e: BaseException) -> DataNotFoundError:
    return DataNotFoundError(
        f"--pretrained: could not fetch the pretrained weights of {name!r} ({type(e).__name__}: {e}). "
        f"Downloading them needs the network (or a cached copy); offline, pass a local file with --weights PATH")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapt_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB conv weight ``(O, 3, kh, kw)`` to ``in_channels`` (timm's rule: sum for 1 channel, else tile
    the RGB filters and rescale by ``3 / in_channels`` so the activation scale is kept)."""
    w = weight.detach()
    old = w.shape[1]
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_channels // old)  # ceil
    return w.repeat(1, reps, 1, 1)[:, :in_channels] * (old / in_channels)


def adapt_first_conv(model: nn.Module, in_channels: int, rgb: int = 3) -> str:
    """Replace the first ``nn.Conv2d`` that reads ``rgb`` channels by one reading ``in_channels`` (weights adapted).

    Returns the replaced module's name; raises ``ConfigError`` when the model has no such convolution.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == rgb and m.groups == 1:
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                            m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
            if m.weight.device.type != "meta":
                with torch.no_grad():
                    new.weight.copy_(adapt_channels(m.weight, in_channels))
                    if m.bias is not None:
                        new.bias.copy_(m.bias)
            set_submodule(model, name, new)
            return name
    raise ConfigError(f"--in-channels {in_channels}: this model has no {rgb}-channel nn.Conv2d to adapt; "
                      f"use in_channels={rgb}")


# ----------------------------------------------------------------------------------------------- torchvision
def torchvision_names() -> list[str]:
    """Classification, detection and segmentation model names (``tv:fasterrcnn_mobilenet_v3_large_fpn``,
    ``tv:lraspp_mobilenet_v3_large``, ...)."""
    import torchvision

    return sorted({*torchvision.models.list_models(module=torchvision.models), *_detection_names(),
                   *_segmentation_names()})


def _detection_names() -> list[str]:
    import torchvision
    import torchvision.models.detection as detection

    return torchvision.models.list_models(module=detection)


def _segmentation_names() -> list[str]:
    import torchvision
    import torchvision.models.segmentation as segmentation

    return torchvision.models.list_models(module=segmentation)


def _unfreeze_batchnorm(model: nn.Module) -> None:
    """Pretrained torchvision detectors use ``FrozenBatchNorm2d``; a rebuild without weights has ``BatchNorm2d``:
    swap in ``BatchNorm2d`` with the same statistics (same eval outputs), so the saved model rebuilds exactly."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, m in list(model.named_modules()):
        if isinstance(m, FrozenBatchNorm2d):
            bn = nn.BatchNorm2d(m.weight.numel(), eps=m.eps).to(m.weight.device)
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, k).copy_(getattr(m, k))
            set_submodule(model, name, bn.eval())


def create_torchvision(ref: str, *, pretrained: bool | str = False, in_channels: int = 3, num_classes: int = 10,
                       **kwargs: Any) -> nn.Module:
    """A torchvision classification model; ``pretrained=True`` loads ``weights="DEFAULT"`` (a str names weights)."""
    import torchvision

    names = torchvision_names()
    if ref not in names:
        near = closest(ref, names)
        hint = f"; did you mean {', '.join(repr('tv:' + n) for n in near)}?" if near else ""
        raise ConfigError(f"unknown torchvision model 'tv:{ref}'{hint} Valid: tv:<name> for a name in "
                          f"list_models(module=torchvision.models, .detection or .segmentation): {', '.join(names)}")
    get_model = torchvision.models.get_model
    detection = ref in _detection_names()
    if detection and in_channels != 3:
        raise ConfigError(f"--in-channels {in_channels}: detector 'tv:{ref}' normalises 3-channel images; use 3")
    if detection or ref in _segmentation_names():  # no backbone download: the weights come from the run directory
        kwargs.setdefault("weights_backbone", None)
    if ref in _AUX_HEAD_MODELS:  # a tensor from forward in train mode too, not a namedtuple with aux logits
        kwargs.setdefault("aux_logits", False)
    try:
        if not pretrained:
            model = get_model(ref, weights=None, num_classes=num_classes, **kwargs)
        else:
            weights = "DEFAULT" if pretrained is True else str(pretrained)
            try:
                model = get_model(ref, weights=weights, **kwargs)
            except Exception as e:
                if is_network_error(e):
                    raise offline_error(f"tv:{ref}", e) from None
                raise
            _replace_heads(model, lambda: get_model(ref, weights=None, num_classes=num_classes, **kwargs))
            if detection:
                _unfreeze_batchnorm(model)
    except TypeError as e:
        raise ConfigError(f"model 'tv:{ref}': bad constructor argument ({e})") from None
    if in_channels != 3:
        adapt_first_conv(model, in_channels)
        if getattr(model, "transform_input", False):  # googlenet/inception normalise 3 RGB channels by hand
            model.transform_input = False
    from prunekit.models.prunable import make_prunable

    make_prunable(model)  # Swin / ShuffleNetV2: forms that still run once pruned (same outputs unpruned)
    return model


def _replace_heads(model: nn.Module, build_reference) -> None:
    """Swap the pretrained classifier(s) for fresh ones shaped like a model built with the wanted ``num_classes``.

    Comparing with a reference built on the meta device finds the head generically (``fc``, ``classifier.1``,
    ``heads.head``, squeezenet's conv, ...), and guarantees the result has exactly the rebuilt model's structure.
    """
    with torch.device("meta"):
        ref = build_reference()
    ref_modules = dict(ref.named_modules())
    for name, m in list(model.named_modules()):
        r = ref_modules.get(name)
        if (isinstance(m, (nn.Linear, nn.Conv2d)) and type(r) is type(m)
                and r.weight.shape != m.weight.shape):
            new = r.to_empty(device=m.weight.device)
            new.reset_parameters()
            set_submodule(model, name, new)
            log.info("replaced the pretrained head %s: %s -> %s", name, tuple(m.weight.shape), tuple(new.weight.shape))


# ----------------------------------------------------------------------------------------------- timm
def create_timm(ref: str, *, pretrained: bool = False, in_channels: int = 3, num_classes: int = 10,
                **kwargs: Any) -> nn.Module:
    """``timm.create_model(ref, pretrained=..., num_classes=..., in_chans=...)``."""
    try:
        import timm
    except ImportError:
        raise ConfigError("timm: models need the timm package: pip install 'prunekit[vision]'") from None
    if not timm.is_model(ref):
        names = timm.list_models()
        near = closest(ref, names, n=5)
        hint = f"; did you mean {', '.join(repr('timm:' + n) for n in near)}?" if near else ""
        raise ConfigError(f"unknown timm model 'timm:{ref}'{hint} (timm.list_models() lists all {len(names)})")
    try:
        return timm.create_model(ref, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model 'timm:{ref}': bad constructor argument ({e})") from None
    except Exception as e:
        if pretrained and is_network_error(e):
            raise offline_error(f"timm:{ref}", e) from None
        raise


# ----------------------------------------------------------------------------------------------- kwargs, sizes
def parse_scalar(value: Any) -> Any:
    """A command-line string read as a YAML scalar or list: ``"16"`` -> 16, ``"0.5"`` -> 0.5, ``"true"`` -> True,
    ``"null"`` -> None, ``"[8, 8]"`` -> [8, 8]; anything else (a name, a path, ``"no"``) stays the string."""
    if not isinstance(value, str) or not value.strip():
        return value
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        return value  # YAML 1.1 reads yes/no/on/off as booleans: a model argument "no" means the word
    if parsed is None and value.strip().lower() not in ("null", "none", "~"):
        return value
    return parsed if isinstance(parsed, (int, float, bool, list, dict)) or parsed is None else value


def coerce_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``parse_scalar`` on every value (``--model-kwargs img_size=16,drop_rate=0.1`` arrives as strings)."""
    return {k: parse_scalar(v) for k, v in kwargs.items()}


def check_image_size(name: str, image_size: int, kwargs: dict[str, Any]) -> None:
    """A timm model with a fixed input size (ViT, DeiT, Swin: ``fixed_input_size`` in its pretrained config) fed
    images of another size fails deep inside its patch embedding: say so before building it, naming the fixes."""
    if not name.startswith("timm:") or kwargs.get("dynamic_img_size"):
        return
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return
    try:
        cfg = get_pretrained_cfg(name[5:])
    except Exception:  # noqa: BLE001 - an unknown name is create_timm's to report
        return
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return
    size = kwargs.get("img_size") or cfg.input_size[-1]
    h, w = _hw(size)
    if (h, w) != (image_size, image_size):
        raise ConfigError(f"--image-size {image_size}: model {name!r} takes {h}x{w} images only (its patch embedding "
                          f"has a fixed size); pass --image-size {h}, or build it for the data's size with "
                          f"--model-kwargs img_size={image_size} (timm also takes dynamic_img_size=true)")


# ----------------------------------------------------------------------------------------------- input specs
def input_spec(name: str, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The example-input spec of a freshly built model: ``{"kind": "image", "shape": [1, C, H, W]}`` or
    ``{"kind": "text", "seq_len": L, "vocab_size": V}``.
    """
    c = int(kwargs.get("in_channels", 3))
    if name.startswith("hf:"):
        from prunekit.models.hf import hf_input_spec

        return hf_input_spec(model)
    if name.startswith("timm:"):
        size = kwargs.get("img_size") or (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
        h, w = _hw(size)
    elif name.startswith("tv:") and hasattr(model, "transform"):  # a detector: the size its transform resizes to
        h = w = int(kwargs.get("min_size") or model.transform.min_size[0])
    elif name.startswith("tv:"):
        h, w = _hw(getattr(model, "image_size", None) or _tv_crop_size(name[3:]))
    else:
        from prunekit.models.builtin import DEFAULT_IMAGE_SIZE

        h = w = DEFAULT_IMAGE_SIZE
    return {"kind": "image", "shape": [1, c, h, w]}


def _hw(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = list(size)[-2:]
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def _tv_crop_size(ref: str) -> int:
    """The crop size of torchvision's default weights (299 for inception_v3, 224 for most); no download."""
    try:
        from torchvision.models import get_model_weights

        crop = get_model_weights(ref).DEFAULT.transforms().crop_size
        return int(crop[0])
    except Exception:  # models without registered weights
        return TV_DEFAULT_SIZE
