"""Ultralytics YOLO pruned whole: the block rewrite is exact, every conv outside the head's output layers loses
channels, the head's outputs keep their shapes, the ``ultralytics:`` source rebuilds a pruned model, and a ``.pt``
(a pickle) loads only behind ``trust_pickle``. Models at 64 px, built from Ultralytics' yaml (no download)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
tasks = pytest.importorskip("ultralytics.nn.tasks")

import prunekit  # noqa: E402
from prunekit.errors import ConfigError  # noqa: E402
from prunekit.pruning.structured.detect import make_yolo_prunable  # noqa: E402

SIZE = 64


def _random_bn(model: nn.Module) -> nn.Module:
    """``model`` with random BatchNorm weights and statistics (so a wrong channel mapping shows), in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _yolo(cfg: str, seed: int = 0) -> nn.Module:
    """A YOLO model with random weights and BatchNorm statistics (so a wrong split shows), in eval mode."""
    torch.manual_seed(seed)
    model = tasks.DetectionModel(cfg, nc=3, verbose=False)
    return _random_bn(model)


def _convs(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv outside the Detect head."""
    head = {id(m) for m in model.model[-1].modules()}
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in head}


def _head_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the decoded predictions (eval) and of the raw boxes / scores (train mode)."""
    with torch.no_grad():
        y, _ = model.eval()(x)
        raw = model.train()(x)
    model.eval()
    return [tuple(y.shape), tuple(raw["boxes"].shape), tuple(raw["scores"].shape)]


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_rewrite_is_exact(cfg: str) -> None:
    model = _yolo(cfg)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)[0]
    assert make_yolo_prunable(model) > 0
    assert not [n for n, m in model.named_modules() if hasattr(m, "cv1b") and "cv1" in m._modules]
    with torch.no_grad():
        after = model(x)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def _attention(dim: int = 64, heads: int = 4, seed: int = 0) -> nn.Module:
    """A stem conv and Ultralytics' PSA ``Attention`` (``heads`` heads), random weights and BatchNorm statistics."""
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.modules.block import Attention

    torch.manual_seed(seed)
    model = nn.Sequential(Conv(3, dim, 3), Attention(dim, num_heads=heads))
    return _random_bn(model)


def test_attention_rewrite_is_exact() -> None:
    """``qkv`` split into one conv per head and role (q, k, v): the same outputs on random weights."""
    model, x = _attention(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert make_yolo_prunable(model) == 1
    attn = model[1]
    assert "qkv" not in attn._modules and len(attn.q) == len(attn.k) == len(attn.v) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def _zero_bn(conv: nn.Module, idxs: list[int]) -> None:
    """An Ultralytics ``Conv`` whose output channels ``idxs`` are exactly 0 (BatchNorm scale and shift 0)."""
    with torch.no_grad():
        conv.bn.weight[idxs] = 0
        conv.bn.bias[idxs] = 0


def test_attention_pruned_per_head_equals_masked() -> None:
    """Each head loses key dims of its own (its q and k rows together, one group per head) and value dims (one
    group: the heads' v rows in ``pe``'s order, their ``pe`` channels and ``proj`` inputs, each head losing its own
    count): the pruned attention equals the dense one with those dims zeroed."""
    model, x = _attention(), torch.randn(2, 3, 8, 8)
    masked = _attention()
    make_yolo_prunable(masked)
    report = prunekit.prune(model, x, criterion="l1", ratio=0.4, scope="local", ignore=[r"0\.conv"],
                            compensate="none")
    attn, ref = model[1], masked[1]
    roots = {g.name: g.removed for g in report.groups}
    assert sorted(roots) == ["1.k.0.conv", "1.k.1.conv", "1.k.2.conv", "1.k.3.conv", "1.pe.conv"]
    assert not report.left_whole
    hd = ref.v[0].conv.out_channels
    values = roots["1.pe.conv"]  # indices into the heads' values, head after head (as pe and proj see them)
    for h in range(4):
        keys = roots[f"1.k.{h}.conv"]
        assert attn.q[h].conv.out_channels == attn.k[h].conv.out_channels == 8 - len(keys)
        _zero_bn(ref.q[h], keys)  # a key dim no longer counts in q . k
        v = [i - h * hd for i in values if h * hd <= i < (h + 1) * hd]
        assert attn.v[h].conv.out_channels == hd - len(v)
        _zero_bn(ref.v[h], v)
    _zero_bn(ref.pe, values)
    assert len({v.conv.out_channels for v in attn.v}) > 1  # the heads keep different value widths
    assert attn.pe.conv.out_channels == attn.proj.conv.in_channels == sum(v.conv.out_channels for v in attn.v)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-5)


def test_attention_key_dims_pruned_with_lstsq_compensation() -> None:
    """With calibration data (compensate='lstsq'), the key dims, which only enter dot products, are pruned too
    (nothing to compensate) instead of being left whole."""
    model, x = _attention(), torch.randn(2, 3, 8, 8)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    report = prunekit.prune(model, x, criterion="variance", ratio=0.4, ignore=[r"0\.conv"], calib_data=calib,
                            compensate="lstsq")
    assert not report.left_whole
    assert sorted(g.name for g in report.groups) == ["1.k.0.conv", "1.k.1.conv", "1.k.2.conv", "1.k.3.conv",
                                                      "1.pe.conv"]
    assert {c["name"] for c in report.compensation} == {"1.proj.conv"}  # the values' consumer
    with torch.no_grad():
        assert model(x).shape == (2, 64, 8, 8)


def _head_convs(model: nn.Module) -> tuple[list[int], list[int]]:
    """(output channels of the head's inner convs, of its output layers: box/DFL and class channels)."""
    branches = [*model.model[-1].cv2, *model.model[-1].cv3]
    inner = [m.out_channels for b in branches for m in b[:-1].modules() if isinstance(m, nn.Conv2d)]
    return inner, [b[-1].out_channels for b in branches]


def test_pruned_whole_raw_model() -> None:
    """The issue's call on a plain Ultralytics model: no conv outside the head left whole, the PSA attention's
    per-head q/k (together) and v convs included."""
    cfg = "yolo11n.yaml"
    model, x = _yolo(cfg), torch.randn(1, 3, SIZE, SIZE)
    shapes, (inner, outputs) = _head_shapes(model, x), _head_convs(model)
    dense = _yolo(cfg)
    make_yolo_prunable(dense)
    dense = _convs(dense)
    report = prunekit.prune(model, x, criterion="l1", target_macs=0.5)
    assert 0.4 <= report.macs_kept <= 0.6
    convs = _convs(model)
    assert [n for n in dense if convs[n] == dense[n]] == []
    attn = "model.10.m.0.attn"
    for h in range(2):  # YOLO11n's C2PSA attention has 2 heads: each head's q and k keep the same key dims
        assert convs[f"{attn}.q.{h}.conv"] == convs[f"{attn}.k.{h}.conv"] < dense[f"{attn}.q.{h}.conv"]
    assert convs[f"{attn}.pe.conv"] == convs[f"{attn}.v.0.conv"] + convs[f"{attn}.v.1.conv"]
    assert _head_shapes(model, x) == shapes
    pruned_inner, pruned_outputs = _head_convs(model)
    assert pruned_outputs == outputs
    assert sum(pruned_inner) < sum(inner)  # the head's inner convs are pruned too


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo11n.yaml"])
def test_source_prune_save_load(tmp_path, cfg: str) -> None:
    """``ultralytics:yolov8n.yaml`` (YOLO11n: with its per-head attention): pruned throughout, saved as safetensors +
    model.json, rebuilt exactly."""
    model = prunekit.create_model(f"ultralytics:{cfg}", num_classes=3, image_size=SIZE).eval()
    assert model.prunekit_spec.input["shape"] == [1, 3, SIZE, SIZE]
    x = torch.randn(1, 3, SIZE, SIZE)
    shapes, dense = _head_shapes(model, x), _convs(model)
    prunekit.prune(model, x, criterion="l1", target_macs=0.5)
    assert [n for n, c in _convs(model).items() if c == dense[n]] == []
    assert _head_shapes(model, x) == shapes
    prunekit.save_model(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    rebuilt = prunekit.load_model(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], model(x)[0])


def test_checkpoint_needs_trust_pickle(tmp_path) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(b"not read")  # never opened without the flag
    with pytest.raises(ConfigError, match="trust_pickle"):
        prunekit.create_model(f"ultralytics:{path}")
    with pytest.raises(ConfigError, match="--pretrained"):
        prunekit.create_model("ultralytics:yolov8n.yaml", pretrained=True)
    with pytest.raises(ConfigError, match="multiples of 32"):
        prunekit.create_model("ultralytics:yolov8n.yaml", image_size=50)


def test_checkpoint_with_flag_rebuilds_from_yaml(tmp_path) -> None:
    """With the flag a user's checkpoint loads; its rebuild spec is the yaml (data), not the pickle."""
    path = tmp_path / "best.pt"
    torch.save({"model": _yolo("yolov8n.yaml")}, path)  # what Ultralytics writes: a pickled module
    model = prunekit.create_model(f"ultralytics:{path}", trust_pickle=True, image_size=SIZE)
    assert isinstance(model, tasks.DetectionModel)
    assert model.prunekit_spec.kwargs["cfg"]["nc"] == 3


def test_missing_ultralytics_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ultralytics.nn", None)
    with pytest.raises(ConfigError, match=r"pip install prunekit\[detect\]"):
        prunekit.create_model("ultralytics:yolov8n.yaml")


def test_segment_head_keeps_its_outputs() -> None:
    """YOLOv8n-seg: box, class, mask-coefficient and prototype channels keep their sizes; the rest is pruned."""
    from prunekit.pruning.structured.detect import without_features
    from prunekit.pruning.structured.verify import output_shapes

    torch.manual_seed(0)
    model, x = tasks.SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False).eval(), torch.randn(1, 3, SIZE, SIZE)

    def shapes() -> list[tuple[int, ...]]:
        with torch.no_grad():
            out = output_shapes(without_features(model.eval()(x))) + output_shapes(without_features(model.train()(x)))
        model.eval()
        return out

    before = shapes()
    make_yolo_prunable(model)
    dense = _convs(model)
    report = prunekit.prune(model, x, criterion="l1", target_macs=0.5)
    assert 0.4 <= report.macs_kept <= 0.6
    assert shapes() == before
    assert [n for n, c in _convs(model).items() if c == dense[n]] == []


def test_rolled_back_prune_then_prune_again(monkeypatch) -> None:
    """A failed call leaves the model's outputs and state-dict keys as they were; the next call prunes it whole."""
    from prunekit.pruning.structured.engine import StructuredPruner

    model, x = _yolo("yolov8n.yaml"), torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        before, keys = model(x)[0], list(model.state_dict())

    def fail(self) -> None:
        raise RuntimeError("injected")

    with monkeypatch.context() as mp:
        mp.setattr(StructuredPruner, "recalibrate", fail)
        with pytest.raises(prunekit.errors.PruningError, match="injected"):
            prunekit.prune(model, x, criterion="l1", target_macs=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before, atol=0, rtol=0)
    assert list(model.state_dict()) == keys
    dense = _convs(model)
    prunekit.prune(model, x, criterion="l1", target_macs=0.5)
    convs = _convs(model)
    assert sum(convs.values()) < sum(c for n, c in dense.items() if n in convs)
    assert not [n for n, c in convs.items() if n in dense and c == dense[n]]


def test_onnx_export_goes_straight_to_torch_export_and_falls_back_cleanly(tmp_path, monkeypatch, caplog) -> None:
    """A YOLO model exports through the torch.export-based exporter, no failure logged; when that exporter fails after
    its trace (injected here), the TorchScript-based one still works: the head's anchors cached during the trace
    (symbolic sizes) are recomputed on real inputs first."""
    from prunekit.export.onnx import export_onnx
    from prunekit.export.stage import ExportOptions, export_model
    from prunekit.pipeline.detect import export_form

    model, x = export_form(_yolo("yolov8n.yaml")), torch.rand(1, 3, SIZE, SIZE)
    with caplog.at_level("WARNING"):
        manifest = export_model(model, x, tmp_path, ["onnx"], verify_inputs=torch.rand(2, 3, SIZE, SIZE), atol=1e-3)
    assert manifest["formats"]["onnx"]["exporter"] == "dynamo" and manifest["formats"]["onnx"]["verify"]["ok"]
    assert "failed" not in caplog.text
    real = torch.onnx.export

    def conversion_fails(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("injected conversion failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", conversion_fails)
    info = export_onnx(model, (x,), ["input"], ["output"], tmp_path / "fallback.onnx", ExportOptions())
    assert info["exporter"] == "torchscript" and "injected conversion failure" in caplog.text
