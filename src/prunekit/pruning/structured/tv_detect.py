"""torchvision detectors (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite) pruned whole.

A torchvision detector takes a list of images and returns, in eval mode, boxes/labels/scores after decoding and NMS:
torch-pruning cannot follow channels through that (its trace of the full forward broke the RoI box head and left the
last layer whole). ``make_tv_detection_prunable(model)``, run by the engine on every model:

- traces the detector through ``TRACE_FORMS`` (see ``prunekit.pruning.structured.trace``): the transform, the
  backbone (body + FPN) and the heads' raw per-level outputs, which are model outputs, so the layers that make
  them (RPN objectness and box deltas, class logits, box regression, FCOS centerness, R-CNN box/mask/keypoint
  predictors) keep their size (classes, anchors per location) and every layer before them is pruned. The RoI heads
  read the FPN through ``MultiScaleRoIAlign``, which needs proposals: the trace pools the first pooled level to the
  RoI size instead (same channels, same flatten into ``fc6``);
- registers a pruner for ``FrozenBatchNorm2d`` (pretrained torchvision backbones use it; its statistics are buffers
  that torch-pruning would leave at full size);
- lets the check of a selection on a meta copy (``verify``) run the same raw forward (``CHECK_FORMS``: the
  postprocessing cannot run on the meta device), so a group whose pruning breaks a head is left whole with a
  warning; and tells it (``OUTPUT_VIEWS``) that the number of detections is data, not shape.

Nothing here imports ``torchvision.models.detection`` unless the model was built with it (it is then imported).

Example:
    >>> m = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    >>> prunekit.prune(m.eval(), torch.rand(1, 3, 320, 320), criterion="l2", target_macs=0.5)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- FrozenBatchNorm2d
class FrozenBatchNormPruner(tp.pruner.function.BasePruningFunc):
    """torchvision's ``FrozenBatchNorm2d``: weight, bias and statistics are buffers, pruned together. Input and
    output side are one function (torch-pruning then couples them, as for BatchNorm)."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - {int(i) for i in idxs})
        index = torch.tensor(keep, dtype=torch.long, device=layer.weight.device)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(layer, name, torch.index_select(getattr(layer, name), 0, index))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


# ----------------------------------------------------------------------------------------------- trace forms
def _features(model: nn.Module, images: Any) -> dict[str, Tensor]:
    """The detector's transform (normalise, resize, batch) and backbone: its feature maps, one per level."""
    if isinstance(images, Tensor) and images.dim() == 3:
        images = [images]
    batch, _ = model.transform(list(images))  # (B, 3, H', W') padded to the size divisor
    feats = model.backbone(batch.tensors)
    return dict(feats) if isinstance(feats, dict) else {"0": feats}


def _roi_branch(model: nn.Module, prefix: str, feats: dict[str, Tensor]) -> list[Tensor]:
    """An R-CNN RoI branch (``box``, ``mask``, ``keypoint``): the first pooled level, pooled to the RoI size, through
    the branch's head and predictor (what ``MultiScaleRoIAlign`` feeds it, without proposals)."""
    heads = model.roi_heads
    pool, head, predictor = (getattr(heads, f"{prefix}_{part}", None) for part in ("roi_pool", "head", "predictor"))
    if pool is None or head is None or predictor is None:
        return []
    names = getattr(pool, "featmap_names", None) or list(feats)
    pooled = F.adaptive_avg_pool2d(feats[names[0]], pool.output_size)  # (B, C, h, w): the RoI features' layout
    out = predictor(head(pooled))
    return list(out) if isinstance(out, (tuple, list)) else [out]


def rcnn_trace(self: nn.Module, images: Any, targets: Any = None) -> list[Tensor]:
    """What torch-pruning traces of a ``GeneralizedRCNN``: the RPN's per-level objectness and box deltas, then each
    RoI branch's predictor outputs."""
    feats = _features(self, images)
    objectness, deltas = self.rpn.head(list(feats.values()))
    outs = [*objectness, *deltas]
    for prefix in ("box", "mask", "keypoint"):
        outs += _roi_branch(self, prefix, feats)
    return outs


def retinanet_trace(self: nn.Module, images: Any, targets: Any = None) -> list[Tensor]:
    """RetinaNet / FCOS: every level's class logits and box regression (and FCOS centerness) before the reshape."""
    feats = list(_features(self, images).values())
    cls, reg = self.head.classification_head, self.head.regression_head
    outs = []
    for f in feats:
        outs.append(cls.cls_logits(cls.conv(f)))
        r = reg.conv(f)
        outs += [getattr(reg, name)(r) for name in ("bbox_reg", "bbox_ctrness") if hasattr(reg, name)]
    return outs


def ssd_trace(self: nn.Module, images: Any, targets: Any = None) -> list[Tensor]:
    """SSD / SSDlite: every level's regression and classification block output before the reshape."""
    feats = list(_features(self, images).values())
    outs = []
    for head in (self.head.regression_head, self.head.classification_head):
        outs += [head.module_list[i](f) for i, f in enumerate(feats)]
    return outs


# ----------------------------------------------------------------------------------------------- output view
def without_counts(out: Any) -> Any:
    """A detector's eval output with the number of detections (data, not shape) taken out: every tensor of each
    image's dict sliced to zero rows; train-mode losses (scalars) and anything else pass through."""
    if isinstance(out, list) and all(isinstance(o, dict) for o in out):
        return [{k: v[:0] if isinstance(v, Tensor) and v.dim() else v for k, v in o.items()} for o in out]
    return out


def _forms() -> dict[type, Callable[..., list[Tensor]]]:
    """Detector class -> its trace form (subclasses are matched at registration, by ``isinstance``)."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return {GeneralizedRCNN: rcnn_trace, RetinaNet: retinanet_trace, FCOS: retinanet_trace, SSD: ssd_trace}


def trace_form(model: nn.Module) -> Callable[..., list[Tensor]] | None:
    """The trace form of a torchvision detector (``None`` for any other model)."""
    if "torchvision.models.detection" not in sys.modules:
        return None
    return next((f for cls, f in _forms().items() if isinstance(model, cls)), None)


def head_output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the layers that make a detector's raw head outputs (class logits, box deltas, ...): the layers
    whose output channels pruning keeps. ``[]`` for a model that is not a torchvision detector."""
    form = trace_form(model)
    if form is None:
        return []
    made: dict[int, str] = {}  # id of a layer's output -> the layer (the last writer wins: ids of freed tensors recur)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: made.__setitem__(id(o), n)) for n, m in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            outs = form(model.eval(), example_inputs)
            return sorted({made[id(o)] for o in outs if id(o) in made})
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def make_tv_detection_prunable(model: nn.Module) -> int:
    """Register the trace form of every torchvision detector in ``model``, the ``FrozenBatchNorm2d`` pruner and the
    detectors' output view (see the module docstring); returns how many detectors were found (0, and nothing
    registered, for a model built without ``torchvision.models.detection``)."""
    if "torchvision.models.detection" not in sys.modules:
        return 0
    from torchvision.ops.misc import FrozenBatchNorm2d

    from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS, TRACE_FORMS
    from prunekit.pruning.structured.verify import CHECK_FORMS, OUTPUT_VIEWS

    CUSTOMIZED_PRUNERS.setdefault(FrozenBatchNorm2d, FrozenBatchNormPruner())
    found = 0
    for m in model.modules():
        form = trace_form(m)
        if form is not None:
            TRACE_FORMS.setdefault(type(m), form)  # exact types: FasterRCNN, MaskRCNN, SSD, ... each get one
            OUTPUT_VIEWS.setdefault(type(m), without_counts)
            CHECK_FORMS.setdefault(type(m), form)  # the meta check of a selection runs the raw heads
            found += 1
    if found:
        log.info("%s: traced through its heads' raw outputs (torchvision detector; they keep their channels)",
                 type(model).__name__)
    return found
