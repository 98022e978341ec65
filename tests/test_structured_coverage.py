"""Coverage of the torchvision models torch-pruning 1.6 cannot map alone: ShuffleNetV2 (its channel shuffle) and
Swin / Swin-V2 past their MLPs (residual stream, heads, patch merging), through prunekit's prunable forms
(``prunekit.models.prunable``) and trace forms (``prunekit.pruning.structured.trace``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit import runs
from prunekit.export import ExportOptions, export_model
from prunekit.models.prunable import ChannelShuffle, make_prunable
from prunekit.pruning import prune
from prunekit.pruning.structured.graph import PruningGraph

torchvision = pytest.importorskip("torchvision")


def _torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=7).eval()


@pytest.mark.parametrize("name,size", [("shufflenet_v2_x0_5", 64), ("swin_t", 32), ("swin_v2_t", 32)])
def test_prunable_forms_give_torchvisions_outputs(name, size):
    """The swapped forms compute what torchvision's modules compute (unpruned), and create_model applies them."""
    original = _torchvision(name)
    form = copy.deepcopy(original)
    assert make_prunable(form) > 0
    assert type(form) is type(original)  # only inner modules are swapped
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(form(x), original(x), rtol=1e-5, atol=1e-5)
    built = prunekit.create_model(f"tv:{name}", num_classes=7)
    assert make_prunable(built) == 0  # already in its prunable form


def test_channel_shuffle_permutation_and_its_pruning():
    shuffle = ChannelShuffle(6, 2)
    x = torch.arange(6.0).view(1, 6, 1, 1)
    # torchvision's channel_shuffle of 2 groups interleaves the halves
    torch.testing.assert_close(shuffle(x).flatten(), torch.tensor([0.0, 3, 1, 4, 2, 5]))
    shuffle.remove_inputs([3])  # input channel 3 goes, the rest keep their shuffled order
    kept = torch.tensor([0.0, 1, 2, 4, 5]).view(1, 5, 1, 1)
    torch.testing.assert_close(shuffle(kept).flatten(), torch.tensor([0.0, 1, 4, 2, 5]))


def _zero_removed_bn_channels(model: nn.Module, x: torch.Tensor, groups: list) -> nn.Module:
    """Mask instead of prune: every BatchNorm of each pruned group outputs 0 on the removed channels."""
    g = PruningGraph(model, x)
    with torch.no_grad():
        for rec in groups:
            root = g.modules[rec.name]
            group = g.DG.get_pruning_group(root, g.DG.get_pruner_of_module(root).prune_out_channels, rec.removed)
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, nn.BatchNorm2d) and g.DG.is_out_channel_pruning_fn(dep.handler):
                    m.weight[idxs] = 0
                    m.bias[idxs] = 0
    return model


def test_shufflenet_prunes_through_the_shuffle_like_masking(tmp_path):
    model = prunekit.create_model("tv:shufflenet_v2_x0_5", num_classes=7).eval()
    masked = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    report = prune(model, x, ratio=0.5)
    assert not report.left_whole
    assert report.macs_after < 0.5 * report.macs_before
    # the stream crosses every shuffle: the producers of stage 2's stream and the stage 3 input lost channels
    assert model.stage2[0].branch1[2].out_channels < 24 and model.stage3[0].branch2[0].in_channels < 48
    assert len(model.stage2[1].shuffle.perm) < 48
    xs = torch.randn(3, 3, 64, 64)
    _zero_removed_bn_channels(masked, x, report.groups)
    with torch.no_grad():
        y = model(xs)
        torch.testing.assert_close(y, masked(xs), rtol=1e-4, atol=1e-5)
    runs.save_model(tmp_path / "run", model)
    loaded = runs.load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs), y, rtol=0, atol=0)
    manifest = export_model(loaded, torch.randn(2, 3, 64, 64), tmp_path / "export", ["onnx"],
                            options=ExportOptions(onnx_exporter="torchscript"), verify_inputs=xs)
    assert manifest["formats"]["onnx"]["verify"]["ok"]


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_prunes_stream_heads_and_patch_merging(name, tmp_path):
    model = prunekit.create_model(f"tv:{name}", num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5, heads=True)
    assert not report.left_whole
    assert report.macs_after <= 0.55 * report.macs_before
    stem, merge = model.features[0][0], model.features[2]
    assert stem.out_channels < 96 and merge.reduction.in_features == 4 * stem.out_channels
    assert merge.reduction.out_features < 192
    blocks = [(b.attn, h) for stage, h in ((1, 3), (3, 6), (5, 12), (7, 24)) for b in model.features[stage]]
    assert any(a.num_heads < h for a, h in blocks)
    for a, _ in blocks:
        assert a.qkv.out_features == 3 * a.num_heads * 32 and a.proj.in_features == a.num_heads * 32  # head_dim 32
        tables = [a.logit_scale.shape[0], a.cpb_mlp[-1].out_features] if name == "swin_v2_t" else \
            [a.relative_position_bias_table.shape[1]]
        assert tables == [a.num_heads] * len(tables)
    xs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(xs)
    assert y.shape == (3, 7) and torch.isfinite(y).all()
    runs.save_model(tmp_path / "run", model)
    loaded = runs.load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs), y, rtol=0, atol=0)
    manifest = export_model(loaded, torch.randn(2, 3, 32, 32), tmp_path / "export", ["onnx"],
                            options=ExportOptions(onnx_exporter="torchscript"), verify_inputs=xs)
    assert manifest["formats"]["onnx"]["verify"]["ok"]


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_head_removal_equals_masking_the_heads(name):
    """Pruning whole heads (qkv rows, proj columns and the per-head bias tables / logit scales) gives what zeroing
    those heads' proj columns gives on the unpruned model: the per-head tables of the kept heads line up."""
    model = prunekit.create_model(f"tv:{name}", num_classes=7).eval()
    masked = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5, heads=True, only=[r".*\.attn"])
    heads = [r for r in report.groups if r.heads_before is not None]
    assert heads and all(r.name.endswith(".attn.qkv") for r in report.groups)
    assert any(r.heads_after < r.heads_before for r in heads)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for r in heads:
            attn = modules[r.name[: -len(".qkv")]]
            a = attn.qkv.out_features // 3
            attn.proj.weight[:, [i - 2 * a for i in r.removed if i >= 2 * a]] = 0
        xs = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(xs), masked(xs), rtol=1e-4, atol=1e-5)


def test_timm_swin_prunes_its_stream_and_patch_merging(tmp_path):
    """timm's Swin runs fine once pruned (its attention width is its own); only its tracing goes through the trace
    forms: the stream, the patch merging and the MLPs are pruned, nothing left whole."""
    pytest.importorskip("timm")
    kw = dict(img_size=32, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4))
    model = prunekit.create_model("timm:swin_tiny_patch4_window7_224", num_classes=7, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, x, ratio=0.5)
    assert not report.left_whole
    assert report.macs_after <= 0.55 * report.macs_before
    stem, merge = model.patch_embed.proj, model.layers[1].downsample
    assert stem.out_channels < 32 and merge.reduction.in_features == 4 * stem.out_channels
    xs = torch.randn(3, 3, 32, 32)
    runs.save_model(tmp_path / "run", model)
    loaded = runs.load_model(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs), model(xs), rtol=0, atol=0)
