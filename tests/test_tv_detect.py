"""torchvision detectors pruned whole (issue 28): every inner layer in a prunable group, the heads' raw outputs kept,
the eval and train forwards after pruning, save/load, ``FrozenBatchNorm2d``, the ``tv:`` names. Random weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import StructuredConfig
from prunekit.pruning.structured.tv_detect import head_output_layers, trace_form

detection = pytest.importorskip("torchvision.models.detection")

SMALL = {"min_size": 64, "max_size": 64}  # R-CNN / RetinaNet resize to 800 px by default


def _rcnn(**kw) -> nn.Module:
    torch.manual_seed(0)
    return prunekit.create_model("tv:fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, **SMALL, **kw).eval()


def _raw_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in trace_form(model)(model.eval(), x)]


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _forwards(model: nn.Module, size: int) -> None:
    """Eval forward: boxes/labels/scores per image; train forward: finite losses (2 images: SSDlite's last level
    is 1 x 1 and its BatchNorm needs more than one value in train mode)."""
    x = [torch.rand(3, size, size) for _ in range(2)]
    with torch.no_grad():
        out = model.eval()(x)
    assert len(out) == 2 and all(o["boxes"].shape[-1] == 4 and o["scores"].shape == o["labels"].shape for o in out)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, size / 2, size / 2]]), "labels": torch.tensor([1])}] * 2
    losses = model.train()(x, targets)
    model.eval()
    assert losses and all(math.isfinite(float(v.detach())) for v in losses.values())


RCNN_OUTPUTS = {"rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                "roi_heads.box_predictor.bbox_pred"}
SSD_OUTPUTS = {f"head.{h}_head.module_list.{i}.1" for h in ("classification", "regression") for i in range(6)}


@pytest.mark.parametrize("name,size,kw,expected", [("fasterrcnn_mobilenet_v3_large_fpn", 64, SMALL, RCNN_OUTPUTS),
                                                   ("ssdlite320_mobilenet_v3_large", 320, {}, SSD_OUTPUTS)])
def test_every_inner_layer_is_in_a_prunable_group(name: str, size: int, kw: dict, expected: set[str]) -> None:
    torch.manual_seed(0)
    model = prunekit.create_model(f"tv:{name}", num_classes=3, **kw).eval()
    x = torch.rand(1, 3, size, size)
    outputs = set(head_output_layers(model, x))
    assert outputs == expected  # class logits, box regression, RPN objectness: the layers that keep their channels
    graph = PruningGraph(model, x)
    units = plan_units(graph, StructuredConfig(criterion="l2", ratio=0.5))
    prunable = {n for u in units for n in u.layers}
    inner = set(_layers(model)) - outputs
    assert graph.left_whole == {}
    assert inner - prunable == set(), sorted(inner - prunable)
    assert not outputs & prunable  # the heads' output layers keep their channels


def test_faster_rcnn_pruned_to_half_the_macs_keeps_heads_and_runs() -> None:
    model = _rcnn()
    x = torch.rand(1, 3, 64, 64)
    outputs = head_output_layers(model, x)
    before, shapes = {n: _width(m) for n, m in _layers(model).items()}, _raw_shapes(model, x)
    report = prunekit.prune(model, x, criterion="l2", target_macs=0.5)
    after = {n: _width(m) for n, m in _layers(model).items()}
    assert report.macs_after / report.macs_before == pytest.approx(0.5, abs=0.05)
    assert _raw_shapes(model, x) == shapes  # objectness, box deltas, class logits, box regression: same shapes
    assert all(after[n] == before[n] for n in outputs)
    assert [n for n in after if n not in outputs and after[n] == before[n]] == []  # nothing inner left whole
    _forwards(model, 64)


@pytest.mark.slow
def test_ssdlite_variance_with_calibration_runs() -> None:
    torch.manual_seed(0)
    model = prunekit.create_model("tv:ssdlite320_mobilenet_v3_large", num_classes=3).eval()
    x = torch.rand(1, 3, 320, 320)
    shapes, params = _raw_shapes(model, x), prunekit.count_params(model)
    calib = [torch.rand(2, 3, 320, 320) for _ in range(2)]  # batches of 2: BatchNorm re-estimation at 1 x 1
    prunekit.prune(model, x, criterion="variance", target_macs=0.5, calib_data=calib)
    assert _raw_shapes(model, x) == shapes
    assert prunekit.count_params(model) < 0.8 * params
    _forwards(model, 320)


@pytest.mark.slow
def test_retinanet_pruned_runs() -> None:
    torch.manual_seed(0)
    model = prunekit.create_model("tv:retinanet_resnet50_fpn", num_classes=3, **SMALL).eval()
    x = torch.rand(1, 3, 64, 64)
    shapes = _raw_shapes(model, x)
    report = prunekit.prune(model, x, criterion="l2", target_macs=0.5)
    assert report.macs_after < 0.6 * report.macs_before
    assert _raw_shapes(model, x) == shapes
    _forwards(model, 64)


def test_save_load_rebuilds_the_pruned_detector_exactly(tmp_path) -> None:
    model = _rcnn()
    x = torch.rand(1, 3, 64, 64)
    prunekit.prune(model, x, criterion="l2", ratio=0.3)
    prunekit.save_model(tmp_path, model)
    loaded = prunekit.load_model(tmp_path)
    assert {n: tuple(p.shape) for n, p in loaded.state_dict().items()} == \
        {n: tuple(p.shape) for n, p in model.state_dict().items()}
    with torch.no_grad():
        for a, b in zip(trace_form(model)(model.eval(), x), trace_form(loaded)(loaded, x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(loaded([x[0]]), model([x[0]]), rtol=0, atol=0)


def test_frozen_batchnorm_is_pruned_with_its_conv() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    for k in ("weight", "bias", "running_mean", "running_var"):
        getattr(model[1], k).copy_(torch.rand(8) + 0.5)
    with torch.no_grad():  # channel c's L2 norm grows with c: l2 removes 0..3
        model[0].weight.mul_(torch.arange(1, 9, dtype=torch.float).view(8, 1, 1, 1) / model[0].weight.flatten(1)
                             .norm(dim=1).view(8, 1, 1, 1))
    dense = [t.detach().clone() for t in (model[0].weight, model[0].bias, model[3].weight, model[1].weight,
                                          model[1].bias, model[1].running_mean, model[1].running_var)]
    x = torch.rand(2, 3, 8, 8)
    prunekit.prune(model, x, criterion="l2", ratio=0.5, compensate="none")
    keep = [4, 5, 6, 7]
    assert model[1].weight.shape == (4,) and model[1].running_var.shape == (4,)
    w0, b0, w3, fw, fb, fm, fv = dense
    y = nn.functional.conv2d(x, w0[keep], b0[keep])
    y = (y - fm[keep].view(1, -1, 1, 1)) * (fw[keep] / (fv[keep] + model[1].eps).sqrt()).view(1, -1, 1, 1)
    y = nn.functional.conv2d((y + fb[keep].view(1, -1, 1, 1)).relu(), w3[:, keep], model[3].bias)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_tv_detection_names_build_offline_and_check_channels() -> None:
    from prunekit.models.external import torchvision_names

    assert {"fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large",
            "retinanet_resnet50_fpn", "resnet18"} <= set(torchvision_names())
    model = _rcnn()  # weights_backbone=None by default: would download otherwise
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.prunekit_spec.input["shape"] == [1, 3, 64, 64]
    with pytest.raises(ConfigError, match="in-channels 1"):
        prunekit.create_model("tv:fasterrcnn_mobilenet_v3_large_fpn", in_channels=1)


@pytest.mark.slow
def test_a_group_that_breaks_the_heads_is_left_whole_with_a_warning(monkeypatch, caplog) -> None:
    import logging

    from prunekit.pruning.structured import tv_detect, verify

    model = _rcnn()
    x = torch.rand(1, 3, 64, 64)
    tv_detect.make_tv_detection_prunable(model)

    def strict(m: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:  # a head that needs the FPN's 256 channels
        feats = tv_detect._features(m, images)["0"]
        return [*tv_detect.rcnn_trace(m, images), nn.functional.conv2d(feats, feats.new_zeros(1, 256, 1, 1))]

    monkeypatch.setitem(verify.CHECK_FORMS, type(model), strict)  # what the check of a selection on meta runs
    with caplog.at_level(logging.WARNING):
        prunekit.prune(model, x, criterion="l2", ratio=0.3)
    assert model.backbone.fpn.layer_blocks[0][0].out_channels == 256
    assert "backbone.fpn.layer_blocks" in caplog.text and "left unpruned" in caplog.text
    assert model.backbone.fpn.inner_blocks[0][0].out_channels < 256  # the rest is pruned
    _forwards(model, 64)
