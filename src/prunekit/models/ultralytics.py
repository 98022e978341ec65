"""The ``ultralytics:`` model source: YOLO models built from Ultralytics' own yaml (no download), or a user's ``.pt``.

``ultralytics:yolov8n.yaml`` (any yaml Ultralytics knows: ``yolo11n.yaml``, ``yolov8n-seg.yaml``, ..., or a path to a
yaml) builds the task model (detect, segment, pose, obb, classify) with ``nc=num_classes`` and ``ch=in_channels``.
``ultralytics:path/to/best.pt`` loads a checkpoint: Ultralytics' ``.pt`` files are pickles, which run code from the
file when loaded, so this needs ``trust_pickle=True`` (``--model-kwargs trust_pickle=true``); without it a
``ConfigError``. The model's rebuild spec then holds its yaml (``cfg``), so a saved or pruned model is rebuilt from
data, never from the pickle again; prunekit itself writes safetensors only.

Every model gets ``rewrite_yolo`` (its C2f / C3k2 / C2PSA blocks rewritten into equal prunable forms), so a
model rebuilt by ``load_model`` has the same layers as the one that was pruned.

Example:
    >>> model = prunekit.create_model("ultralytics:yolov8n.yaml", num_classes=3, image_size=64)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import ConfigError

PREFIX = "ultralytics:"
INSTALL = "pip install prunekit[detect]"
DEFAULT_IMAGE_SIZE = 640
_TASK_MODELS = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel",
                "obb": "OBBModel", "classify": "ClassificationModel"}


def import_ultralytics() -> Any:
    """``ultralytics.nn.tasks``, offline (``YOLO_OFFLINE=1`` unless set); a ``ConfigError`` when not installed."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics.nn import tasks
    except ImportError as e:
        raise ConfigError(f"model source {PREFIX!r} needs the ultralytics package, which is not installed ({e}); "
                          f"{INSTALL}") from e
    return tasks


def create_ultralytics(ref: str, *, pretrained: bool | str = False, in_channels: int = 3, num_classes: int = 10,
                       image_size: int = DEFAULT_IMAGE_SIZE, trust_pickle: bool = False,
                       cfg: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Build ``ultralytics:<ref>`` (a yaml name or path, or a ``.pt`` with ``trust_pickle=True``).

    Args:
        ref: what follows ``ultralytics:``.
        pretrained: not supported (Ultralytics' weights are pickles to download): pass your ``.pt`` as ``ref``.
        in_channels: image channels (``ch``); ignored for a ``.pt``.
        num_classes: classes (``nc``); ignored for a ``.pt``.
        image_size: the example-input size (a multiple of 32).
        trust_pickle: allow loading a ``.pt`` (a pickle: it runs code from the file).
        cfg: the model's yaml as a dict (written to the rebuild spec for a ``.pt``); built instead of ``ref``.
    """
    if kwargs:
        raise ConfigError(f"model {PREFIX + ref!r}: unknown --model-kwargs {sorted(kwargs)}; valid: image_size, "
                          "trust_pickle")
    if pretrained:
        raise ConfigError(f"--pretrained: model {PREFIX + ref!r}: Ultralytics' pretrained weights are pickles to "
                          f"download; pass your local file as {PREFIX}path/to/model.pt with --model-kwargs "
                          "trust_pickle=true")
    image_size = int(image_size)
    if image_size <= 0 or image_size % 32:
        raise ConfigError(f"--image-size {image_size}: YOLO models take multiples of 32 (their largest stride)")
    tasks = import_ultralytics()
    if cfg is not None:
        model = _from_yaml(tasks, dict(cfg), in_channels, num_classes)
    elif ref.endswith(".pt"):
        model = _from_checkpoint(tasks, ref, trust_pickle)
    elif ref.endswith((".yaml", ".yml")):
        model = _from_yaml(tasks, ref, in_channels, num_classes)
    else:
        raise ConfigError(f"model {PREFIX + ref!r}: expected a yaml (e.g. {PREFIX}yolov8n.yaml, {PREFIX}yolo11n.yaml) "
                          f"or a checkpoint ({PREFIX}path/to/best.pt with --model-kwargs trust_pickle=true)")
    from prunekit.models.yolo_prunable import rewrite_yolo

    rewrite_yolo(model)
    model._prunekit_kwargs = {"image_size": image_size, "cfg": _plain(model.yaml)}  # rebuilt from data
    model._prunekit_input = {"kind": "image", "shape": [1, int(model.yaml.get("ch", in_channels)), image_size,
                                                        image_size]}
    return model


def _from_yaml(tasks: Any, cfg: str | dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    try:
        cfg = cfg if isinstance(cfg, dict) else tasks.yaml_model_load(cfg)  # the task is read from its head
        task = tasks.guess_model_task(cfg)
        return getattr(tasks, _TASK_MODELS.get(task, "DetectionModel"))(cfg, ch=in_channels, nc=num_classes,
                                                                         verbose=False)
    except FileNotFoundError as e:
        raise ConfigError(f"model {PREFIX + str(cfg)!r}: no such Ultralytics yaml ({e}); e.g. {PREFIX}yolov8n.yaml, "
                          f"{PREFIX}yolo11n.yaml, {PREFIX}yolov8n-seg.yaml") from e


def _from_checkpoint(tasks: Any, ref: str, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise ConfigError(f"model {PREFIX + ref!r}: an Ultralytics .pt is a pickle, and loading it runs code from the "
                          "file; pass trust_pickle=True (CLI: --model-kwargs trust_pickle=true) only for a file you "
                          "trust")
    if not Path(ref).is_file():
        raise ConfigError(f"model {PREFIX + ref!r}: no such file {ref!r}")
    model, _ = tasks.load_checkpoint(ref, device="cpu", fuse=False)  # torch.load of a pickle: allowed by the flag
    return model.float()


def _plain(value: Any) -> Any:
    """The yaml dict as JSON data (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
