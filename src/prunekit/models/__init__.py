"""Model registry: built-in models (``register_model``), plus ``tv:<name>``, ``timm:<name>``, ``hf:<name-or-path>``
and ``ultralytics:<yaml-or-pt>``.

Example:
    >>> model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    >>> prunekit.list_models()
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunekit.registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register

# prefixes handled by prunekit.models.external: "tv:", "timm:", "hf:"; "ultralytics:" by .ultralytics
PREFIXES = ("tv:", "timm:", "hf:", "ultralytics:")


def list_models() -> list[str]:
    """Names of the built-in models (``tv:``, ``timm:`` and ``hf:`` names are open-ended)."""
    return MODELS.names()


def check_model_name(name: str) -> str:
    """``name`` if it is a built-in model or has a source prefix (``tv:``, ``timm:``, ``hf:``, checked when built);
    else the ``ConfigError`` (a ``ValueError``, so config validators can use it) listing the built-in names."""
    if ":" not in name:
        MODELS.get(name)
    return name


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10, pretrained: bool = False,
                 weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name and attach its rebuild spec (``model.prunekit_spec``).

    Args:
        name: a built-in name (``list_models()``) or ``tv:<name>``, ``timm:<name>``, ``hf:<name-or-path>``,
            ``ultralytics:<yaml-or-pt>`` (``prunekit.models.ultralytics``).
        in_channels: input image channels (built-in and adapted external vision models).
        num_classes: classifier outputs.
        pretrained: load the source's pretrained weights (downloads where the source needs it).
        weights: a local weights file (safetensors, or a state dict read with ``torch.load(weights_only=True)``).
    """
    from prunekit.models import external
    from prunekit.models.spec import ModelSpec

    # --model-kwargs values arrive as strings: img_size=16 means 16
    all_kwargs = dict(in_channels=in_channels, num_classes=num_classes, **external.coerce_kwargs(kwargs))
    if name.startswith("ultralytics:"):  # YOLO models (prunekit.models.ultralytics)
        from prunekit.models.ultralytics import create_ultralytics

        model = create_ultralytics(name.partition(":")[2], pretrained=pretrained, **all_kwargs)
        all_kwargs.update(model._prunekit_kwargs)
    elif ":" in name:  # tv:, timm:, hf: (an unknown prefix gets an error listing the valid ones)
        model = external.create_external(name, pretrained=pretrained, **all_kwargs)
        all_kwargs.update(getattr(model, "_prunekit_kwargs", {}))  # e.g. the HF config, to rebuild offline
    else:
        if pretrained:
            from prunekit.errors import ConfigError

            raise ConfigError(f"--pretrained: built-in model {name!r} has no pretrained weights; use --weights PATH")
        model = MODELS.get(name)(**all_kwargs)
    if weights:
        from prunekit.models.weights import load_weights

        load_weights(model, weights)
    # the spec never stores `pretrained`/`weights`: a rebuilt model gets its weights from the run directory
    spec_input = getattr(model, "_prunekit_input", None) or external.input_spec(name, model, all_kwargs)
    model.prunekit_spec = ModelSpec(name=name, kwargs=all_kwargs, input=spec_input)
    return model


from prunekit.models import builtin  # noqa: E402,F401  (registers the built-in models)
