"""save_model / load_model for any nn.Module: the dense architecture rebuilt from a registry name, an importable
constructor (module:Class + JSON kwargs) or a builder passed at load, the pruned shapes applied over it, the weights
loaded strictly; and the self-contained alternative, a torch.export program (save_exported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.errors import ConfigError, RunDirError

HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message="Unwrapped parameters")


class TinyNet(nn.Module):
    """A user's own CNN: needs one constructor argument."""

    def __init__(self, width: int):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.bn1(self.c1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class UNet(nn.Module):
    """A small U-Net: two down stages, ConvTranspose2d up-sampling, concatenation skips."""

    def __init__(self, cin: int = 3, width: int = 8, classes: int = 2):
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.e1, self.e2, self.mid = block(cin, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.u2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.d2 = block(4 * width, 2 * width)
        self.u1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.d1 = block(2 * width, width)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.e1(x)  # (B, w, H, W)
        s2 = self.e2(F.max_pool2d(s1, 2))  # (B, 2w, H/2, W/2)
        m = self.mid(F.max_pool2d(s2, 2))  # (B, 4w, H/4, W/4)
        y = self.d2(torch.cat([self.u2(m), s2], dim=1))
        y = self.d1(torch.cat([self.u1(y), s1], dim=1))
        return self.out(y)


def _pruned(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    params = sum(p.numel() for p in model.parameters())
    prunekit.prune(model.eval(), x, criterion="l1", ratio=0.3, scope="local", **kw)
    assert sum(p.numel() for p in model.parameters()) < params  # something was pruned
    return model.eval()


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_registry_name_tv_resnet18(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _pruned(prunekit.create_model("tv:resnet18", num_classes=10), x)
    prunekit.save_model(tmp_path, model)
    assert json.loads((tmp_path / "model.json").read_text())["name"] == "tv:resnet18"
    loaded = prunekit.load_model(tmp_path)
    assert loaded.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels < 64
    _same(model, loaded, x)


def test_constructor_for_a_torchvision_model_built_by_hand(tmp_path):
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _pruned(torchvision.models.resnet18(num_classes=10), x)
    with pytest.raises(RunDirError, match="constructor=.*builder=.*create_model"):
        prunekit.save_model(tmp_path, model)  # ResNet needs block/layers: no JSON kwargs given
    prunekit.save_model(tmp_path, model, constructor="torchvision.models:resnet18", kwargs={"num_classes": 10})
    _same(model, prunekit.load_model(tmp_path), x)


def test_timm_vit_pruned_heads_and_width(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _pruned(prunekit.create_model("timm:vit_tiny_patch16_224", img_size=32, num_classes=10), x, heads=True)
    prunekit.save_model(tmp_path, model)
    loaded = prunekit.load_model(tmp_path)
    assert loaded.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads < 3
    assert loaded.embed_dim == model.patch_embed.proj.out_channels < 192  # attributes come back pruned too
    _same(model, loaded, x)


def test_user_class_importable_with_kwargs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _pruned(TinyNet(16), x)
    prunekit.save_model(tmp_path, model, kwargs={"width": 16}, example_inputs=x)
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["constructor"].endswith(":TinyNet") and spec["kwargs"] == {"width": 16}
    assert spec["input"]["shape"] == [1, 3, 16, 16] and "c1" in spec["modified"]
    loaded = prunekit.load_model(tmp_path)
    assert type(loaded) is TinyNet and loaded.c1.out_channels == model.c1.out_channels < 16
    _same(model, loaded, x)


def test_user_builder(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _pruned(TinyNet(12), x)
    prunekit.save_model(tmp_path, model, builder=lambda: TinyNet(12))
    assert "constructor" not in json.loads((tmp_path / "model.json").read_text())
    with pytest.raises(RunDirError, match="builder="):
        prunekit.load_model(tmp_path)  # nothing recorded: the builder must come back
    _same(model, prunekit.load_model(tmp_path, builder=lambda: TinyNet(12)), x)


def test_unet_with_transposed_convs_and_skips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _pruned(UNet(), x)
    prunekit.save_model(tmp_path, model)  # UNet() needs no argument: its class is recorded with kwargs {}
    loaded = prunekit.load_model(tmp_path)
    assert loaded.u2.out_channels == model.u2.out_channels
    assert (loaded.e1[0].out_channels, loaded.d2[0].in_channels) == (model.e1[0].out_channels, model.d2[0].in_channels)
    _same(model, loaded, x)


def test_a_model_that_cannot_be_rebuilt_names_the_three_ways(tmp_path):
    class Local(nn.Module):  # defined in a function: not importable from a fresh process
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

    with pytest.raises(RunDirError, match="constructor=.*builder=.*create_model"):
        prunekit.save_model(tmp_path, Local())
    with pytest.raises(ConfigError, match="not importable"):
        prunekit.save_model(tmp_path, Local(), constructor=Local)
    with pytest.raises(ConfigError, match=r"kwargs\['act'\]"):
        prunekit.save_model(tmp_path, TinyNet(4), kwargs={"width": 4, "act": nn.ReLU()})
    assert not (tmp_path / "model.json").exists()


def test_exported_program_and_fresh_processes(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _pruned(UNet(), x)
    prunekit.save_exported(tmp_path / "exported", model, x)
    prunekit.save_model(tmp_path / "saved", model)
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["model.json", "model.pt2"]
    x3 = torch.randn(3, 3, 16, 16)  # another batch size: the batch axis is dynamic
    _same(model, prunekit.load_model(tmp_path / "exported"), x3)
    torch.save(x3, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x3), tmp_path / "y.pt")
    code = ("import sys, torch, prunekit; x = torch.load(sys.argv[2], weights_only=True); "
            "y = torch.load(sys.argv[3], weights_only=True); m = prunekit.load_model(sys.argv[1]); "
            "torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5); print(type(m).__name__)")
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}  # the test module: importable
    for folder, cls in (("exported", "GraphModule"), ("saved", "UNet")):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / folder), str(tmp_path / "x.pt"),
                              str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith(cls)
