"""Model coverage (a fast torchvision subset; benchmarks/zoo.py runs them all) and save/load round trips of pruned
models of every family (registry, tv:, timm:, hf:), one of them rebuilt in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import prunekit
from prunekit import runs
from prunekit.errors import PruningError
from prunekit.pruning import prune

# fast and structurally different: residual, depthwise + squeeze-excitation, fire modules (concat), grouped convs
TV_SUBSET = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf"]


@pytest.mark.parametrize("name", TV_SUBSET)
def test_torchvision_model_prunes_at_half_ratio_with_defaults(name):
    pytest.importorskip("torchvision")
    model = prunekit.create_model(f"tv:{name}", num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5)
    assert report.groups_pruned > 0 and report.macs_after < 0.7 * report.macs_before
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name,reasons", [
    ("cspresnet50", {"indices past a layer's size", "breaks the forward pass"}),
    ("rexnet_100", {"runaway group search", "indices past a layer's size"}),
])
def test_timm_models_where_torch_pruning_fails_prune_the_rest(name, reasons):
    """torch-pruning's MetaPruner crashes on these (IndexError; ReXNet: its group search never ends): prunekit
    leaves the groups it cannot prune safely whole, names them with the reason, and prunes the rest."""
    pytest.importorskip("timm")
    model = prunekit.create_model(f"timm:{name}", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    report = prune(model, x, ratio=0.5)
    assert set(report.left_whole.values()) == reasons
    assert report.macs_after < 0.6 * report.macs_before
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unsupported_architecture_raises_a_clear_error(monkeypatch):
    """An architecture listed in graph.UNSUPPORTED is refused by class name with its reason (the list is empty since
    ShuffleNetV2 prunes: tests/test_structured_coverage.py)."""
    from prunekit.pruning.structured import graph

    monkeypatch.setitem(graph.UNSUPPORTED, "SmallCNN", "a reason")
    model = prunekit.create_model("smallcnn", num_classes=7).eval()
    with pytest.raises(PruningError, match="SmallCNN cannot be pruned structurally: a reason"):
        prune(model, torch.randn(1, 3, 32, 32), ratio=0.5)


def _roundtrip(model, x, tmp_path, **prune_kw):
    prune(model, x, **prune_kw)
    model.eval()
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    runs.save_model(tmp_path, model)
    loaded = runs.load_model(tmp_path)
    with torch.no_grad():
        y2 = loaded(**x) if isinstance(x, dict) else loaded(x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert prunekit.count_params(loaded) == prunekit.count_params(model)
    return loaded


def test_roundtrip_registry_model(tmp_path):
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    loaded = _roundtrip(model, torch.randn(2, 1, 16, 16), tmp_path, ratio=0.5)
    assert loaded.layer1[0].conv1.out_channels < 16


def test_roundtrip_torchvision_model(tmp_path):
    pytest.importorskip("torchvision")
    model = prunekit.create_model("tv:squeezenet1_1", num_classes=10)
    loaded = _roundtrip(model.eval(), torch.randn(2, 3, 32, 32), tmp_path, ratio=0.4, round_to=4)
    assert all(m.out_channels % 4 == 0 for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)
               and m.out_channels != 10)


def test_roundtrip_hf_bert_with_heads(tmp_path):
    pytest.importorskip("transformers")
    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100}
    model = prunekit.create_model("hf:tiny-bert", hf_config=cfg, task="sequence-classification", num_classes=3)
    x = runs.example_inputs(model.prunekit_spec, 2)
    loaded = _roundtrip(model.eval(), x, tmp_path, ratio=0.5, heads=True, preset="mlp-only")
    att = loaded.model.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.all_head_size == 16


def test_roundtrip_timm_vit_with_heads_in_a_fresh_process(tmp_path):
    pytest.importorskip("timm")
    model = prunekit.create_model("timm:vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=1)
    x = torch.randn(2, 3, 32, 32)
    _roundtrip(model.eval(), x, tmp_path / "run", ratio=0.5, heads=True)
    from safetensors.torch import save_file

    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "io.safetensors"))
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        import prunekit
        io = load_file({str(tmp_path / "io.safetensors")!r})
        m = prunekit.load_model({str(tmp_path / "run")!r})
        assert m.blocks[0].attn.num_heads == 2, m.blocks[0].attn.num_heads  # 3 heads, ratio 0.5
        with torch.no_grad():
            torch.testing.assert_close(m(io["x"]), io["y"], rtol=0, atol=0)
        print("identical")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "identical" in res.stdout
