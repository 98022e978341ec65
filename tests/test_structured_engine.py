"""The engine: masked == physically pruned, selection rules, MAC targets, BN recalibration, bad inputs."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning import prune, recalibrate_bn
from prunekit.pruning.structured.graph import Unit
from prunekit.pruning.structured.selection import select


# ----------------------------------------------------------------------------------------------- toy models
class ResToy(nn.Module):
    """stem -> residual block (conv1 -> BN -> ReLU -> conv2 -> BN, + identity) -> pool -> fc."""

    def __init__(self, stream: int = 8, inner: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stream, 3, padding=1), nn.BatchNorm2d(stream), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(stream, inner, 3, padding=1), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, stream, 3, padding=1), nn.BatchNorm2d(stream)
        self.fc = nn.Linear(stream, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def masked_copy(model: nn.Module, report, in_dim_of: dict[str, int] | None = None) -> nn.Module:
    """The unpruned model with the removed channels cut off at every consumer (input weights zeroed)."""
    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    for g in report.groups:
        for consumer in g.consumers:
            w = mods[consumer].weight
            w.data[:, g.removed] = 0  # conv (O, I, kh, kw) and linear (O, I): input channels on dim 1
    return masked


def test_masked_equals_pruned_cnn_float64():
    torch.manual_seed(0)
    model = ResToy().double().eval()
    randomise_bn(model)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    pruned = copy.deepcopy(model)
    report = prune(pruned, x, criterion="l1", ratio=0.4, scope="global")
    # the residual stream (stem + conv2 outputs) and the block interior (conv1)
    assert sorted(sorted(g.layers) for g in report.groups) == [["conv1"], ["conv2", "stem.0"]]
    assert pruned.conv1.out_channels < 16 and pruned.stem[0].out_channels < 8
    torch.testing.assert_close(pruned(x), masked_copy(model, report)(x), rtol=1e-10, atol=1e-12)


def vit_toy(depth: int = 2):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=depth,
                             num_heads=4, num_classes=5).double().eval()


def test_masked_equals_pruned_transformer_mlp_and_heads_float64():
    model = vit_toy()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pruned = copy.deepcopy(model)
    report = prune(pruned, x, criterion="l2", ratio=0.5, preset="mlp-only", heads=True)
    heads = {g.name: g for g in report.groups if g.heads_before}
    assert set(heads) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    for b in pruned.blocks:  # attributes follow the weights
        assert b.attn.num_heads == 2 and b.attn.qkv.out_features == 3 * 2 * 8 and b.attn.proj.in_features == 16
    assert sum(b.mlp.fc1.out_features for b in pruned.blocks) == 128  # global: half of the 2 x 128 hidden units
    masked = copy.deepcopy(model)
    for i, b in enumerate(masked.blocks):
        g = heads[f"blocks.{i}.attn.qkv"]
        cols = [c for c in g.removed if c < 32]  # the q block's indices = the proj input columns
        b.attn.proj.weight.data[:, cols] = 0
    mlp = {g.name: g for g in report.groups if not g.heads_before}
    for i, b in enumerate(masked.blocks):
        b.mlp.fc2.weight.data[:, mlp[f"blocks.{i}.mlp.fc1"].removed] = 0
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-12)


class PatchMerge(nn.Module):
    """Swin-style patch merging: 4 strided slices concatenated on the channel dim, which torch-pruning mis-maps."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.red, self.head = nn.Linear(4, 8), nn.LayerNorm(32), nn.Linear(32, 8), nn.Linear(8, 3)

    def forward(self, x):  # (B, H, W, C)
        x = self.fc1(x)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.head(self.red(self.norm(x)).mean((1, 2)))


def test_a_group_that_breaks_the_forward_pass_is_left_out_loudly(caplog):
    model, x = PatchMerge().eval(), torch.randn(2, 4, 4, 4)
    with caplog.at_level("WARNING", logger="prunekit"):
        report = prune(model, x, ratio=0.5)
    assert "1 groups left unpruned" in caplog.text and "fc1" in caplog.text
    assert [g.name for g in report.groups] == ["red"] and model.fc1.out_features == 8
    assert model(x).shape == (2, 3)


# ----------------------------------------------------------------------------------------------- selection
def unit(name: str, size: int) -> Unit:
    return Unit(name=name, module=None, channels=size, layers=[name], consumers=[])


def test_global_selection_ranks_across_units_and_local_per_unit():
    units = [unit("a", 4), unit("b", 4)]
    scores = {"a": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.tensor([5.0, 6.0, 7.0, 0.05])}
    glob = select(units, scores, ratio=0.5, scope="global", max_ratio=1.0)
    assert glob.removed == {"a": [0, 1, 2], "b": [3]}
    loc = select(units, scores, ratio=0.5, scope="local")
    assert loc.removed == {"a": [0, 1], "b": [0, 3]}


def test_max_ratio_caps_a_unit_and_passes_the_rest_on():
    units = [unit("a", 10), unit("b", 10)]
    scores = {"a": torch.arange(10.0) / 100, "b": torch.arange(10.0) + 1}
    sel = select(units, scores, ratio=0.5, scope="global", max_ratio=0.7)
    assert len(sel.removed["a"]) == 7 and len(sel.removed["b"]) == 3  # a capped at 70%, b takes the remainder
    assert sel.capped == ["a"]
    assert select(units, scores, ratio=0.99, max_ratio=1.0).removed["a"] == list(range(9))  # never the last one


def test_round_to_and_overrides():
    units = [unit("a", 16), unit("b", 16)]
    scores = {"a": torch.arange(16.0), "b": torch.arange(16.0)}
    sel = select(units, scores, ratio=0.3, scope="local", round_to=4)
    assert {k: 16 - len(v) for k, v in sel.removed.items()} == {"a": 12, "b": 12}  # 11.2 kept -> 12
    sel = select(units, scores, ratio=0.5, scope="local", overrides={"b": 0.25})
    assert len(sel.removed["a"]) == 8 and len(sel.removed["b"]) == 4


def test_round_to_wide_rounds_wide_units_to_whole_sets_and_narrow_ones_to_round_to():
    """round_to 16 with round_to_wide 64: a unit keeping >= 64 channels gets a multiple of 64, a narrower one a
    multiple of 16 (ONNX Runtime's NCHWc convolutions: filter sets of 4 blocks of 16 channels)."""
    units = [unit("wide", 256), unit("narrow", 96)]
    scores = {u.name: torch.arange(float(u.size)) for u in units}
    kept = lambda sel: {u.name: u.size - len(sel.removed.get(u.name, [])) for u in units}  # noqa: E731
    assert kept(select(units, scores, ratio=0.55, scope="local", round_to=16)) == {"wide": 112, "narrow": 48}
    assert kept(select(units, scores, ratio=0.55, scope="local", round_to=16, round_to_wide=64)) == {
        "wide": 128, "narrow": 48}  # 115.2 -> 128 (nearest multiple of 64); 43.2 -> 48
    assert kept(select(units, scores, ratio=0.3, scope="local", round_to=16, round_to_wide=64)) == {
        "wide": 192, "narrow": 64}  # 179.2 -> 192; 67.2 -> 64
    with pytest.raises(ConfigError, match="`round_to_wide` \\(40\\) must be a multiple of `round_to` \\(16\\)"):
        prune(prunekit.create_model("smallcnn", in_channels=1, num_classes=10), torch.randn(1, 1, 8, 8),
              ratio=0.5, round_to=16, round_to_wide=40)


def test_shortfall_is_an_error_for_an_explicit_ratio():
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    with pytest.raises(PruningError, match="cannot be reached"):
        prune(model, torch.randn(1, 1, 8, 8), ratio=0.95, max_ratio=0.5)


def test_ratio_overrides_by_regex_and_local_scope():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    report = prune(model, torch.randn(1, 1, 8, 8), ratio=0.5, scope="local", preset="interior",
                   ratio_overrides={r"layer1\..*": 0.25})
    kept = {g.name: g.after / g.before for g in report.groups}
    assert kept["layer1.0.conv1"] == pytest.approx(0.75) and kept["layer2.0.conv1"] == pytest.approx(0.5)


def test_ignore_and_only_select_layers():
    x = torch.randn(1, 1, 8, 8)
    report = prune(prunekit.create_model("resnet20", in_channels=1), x, ratio=0.5, preset="interior",
                   ignore=["layer3"])
    assert report.groups and all(not g.name.startswith("layer3") for g in report.groups)
    report = prune(prunekit.create_model("resnet20", in_channels=1), x, ratio=0.5, only=[r"layer2\.1\.conv1"])
    assert [g.name for g in report.groups] == ["layer2.1.conv1"]


def test_classifier_output_is_never_pruned():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    report = prune(model, torch.randn(1, 1, 8, 8), ratio=0.8)
    assert model.fc.out_features == 10 and "fc" not in {g.name for g in report.groups}
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# ----------------------------------------------------------------------------------------------- MAC targets
@pytest.mark.parametrize("target", [0.4])
def test_target_macs_is_hit_within_one_percent(target):
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    x = torch.randn(1, 1, 8, 8)
    before = prunekit.count_macs(model, x)
    report = prune(model, x, criterion="l1", target_macs=target)
    kept = prunekit.count_macs(model, x) / before
    assert abs(kept - target) <= 0.01 * target
    assert report.macs_after == prunekit.count_macs(model, x) and report.macs_before == before
    assert report.search and 0 < report.ratio < 1


def test_target_macs_out_of_reach_is_an_error():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    with pytest.raises(PruningError, match="out of reach"):
        prune(model, torch.randn(1, 1, 8, 8), target_macs=0.05, preset="interior")


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw,match", [
    ({"criterion": "l3"}, r"unknown criterion 'l3'.*l1"),
    ({"ratio": 1.0}, r"ratio.*less than 1"),
    ({"ratio": 0.0}, r"ratio.*greater than 0"),
    ({"target_macs": 1.2}, r"target_macs.*less than 1"),
    ({"ratio": 0.3, "target_macs": 0.5}, r"can't provide both `ratio`.*`target_macs`"),
    ({"preset": "mlp"}, r"unknown preset 'mlp'.*mlp-only"),
    ({"ignore": ["layer9"]}, r"ignore: regex 'layer9' matches no module.*layer1"),
    ({"only": ["conv"]}, r"only: regex 'conv' matches no module.*conv1"),
    ({"ratio_overrides": {"layer1.*": 1.5}}, r"must be in \(0, 1\)"),
    ({"criterion": "taylor"}, r"'taylor' needs calibration data.*labelled"),
    ({"compensate": "mean"}, r"compensate='mean' needs calibration data"),
])
def test_bad_inputs_raise_config_errors(kw, match):
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    with pytest.raises(ConfigError, match=match):
        prune(model, torch.randn(1, 1, 8, 8), **kw)


def test_taylor_with_unlabelled_batches_is_an_error():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    with pytest.raises(PruningError, match="labelled"):
        prune(model, torch.randn(1, 1, 8, 8), criterion="taylor", calib_data=[torch.randn(4, 1, 8, 8)])


def test_taylor_prunes_with_labelled_batches():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    report = prune(model, torch.randn(1, 1, 8, 8), criterion="taylor", ratio=0.3, calib_data=data)
    assert report.groups_pruned > 0 and report.macs_after < report.macs_before


# ----------------------------------------------------------------------------------------------- BatchNorm
def test_recalibrate_bn_estimates_statistics_and_restores_momentum_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5)).eval()
    batches = [torch.randn(8, 1, 6, 6) * 3 + 1 for _ in range(3)]
    n = recalibrate_bn(model, batches, max_batches=2)
    assert n == 2
    bn = model[1]
    assert bn.momentum == 0.3 and not bn.training and not model[2].training
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches[:2]])  # cumulative average over the 2 batches
    means = torch.stack([model[0](b).mean((0, 2, 3)) for b in batches[:2]]).mean(0).detach()
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 2 and feats.shape[1] == 4


class BNChain(nn.Module):
    """conv1 -> BN1 -> ReLU -> conv2 (1x1, no bias) -> BN2 -> ReLU -> pool -> fc: pruning conv1's channels
    makes conv2 a consumer whose removed inputs' means fold exactly into BN2's running mean."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _bn_chain_and_calib():
    torch.manual_seed(0)
    model = BNChain().eval()
    calib = [torch.randn(16, 1, 10, 10) for _ in range(4)]
    recalibrate_bn(model, calib, max_batches=4)  # its statistics are those of the calibration data
    return model, calib


def test_prune_with_calib_data_recalibrates_batchnorm_by_default_and_reports_it():
    model, calib = _bn_chain_and_calib()
    stale = model.bn2.running_var.clone()
    report = prune(model, torch.randn(1, 1, 10, 10), criterion="variance", ratio=0.5, only=["conv1"],
                   calib_data=calib, compensate="mean")
    assert report.bn_recalibration == {"layers": 2, "batches": 4}
    assert "BatchNorm recalibrated: 2 layers on 4 batches" in report.summary()
    with torch.no_grad():  # BN2's statistics are now those of the pruned model's conv2 outputs
        feats = torch.cat([model.conv2(torch.relu(model.bn1(model.conv1(b)))) for b in calib])
    # (BN1 normalises with batch statistics while BN2 is re-estimated, as in training: close, not equal)
    torch.testing.assert_close(model.bn2.running_mean, feats.mean((0, 2, 3)), rtol=0, atol=1e-3)
    assert not torch.allclose(model.bn2.running_var, stale)


def test_recalibration_can_be_turned_off_and_says_so(caplog):
    model, calib = _bn_chain_and_calib()
    stale = model.bn2.running_var.clone()
    with caplog.at_level("INFO"):
        report = prune(model, torch.randn(1, 1, 10, 10), criterion="variance", ratio=0.5, only=["conv1"],
                       calib_data=calib, compensate="mean", recalibrate_bn=False)
    assert report.bn_recalibration == {"skipped": "recalibrate_bn=False"}
    assert "NOT recalibrated" in report.summary()
    assert "keep the statistics of the unpruned model" in caplog.text
    torch.testing.assert_close(model.bn2.running_var, stale)  # untouched


def test_recalibration_without_data_is_an_error_and_no_data_is_a_warning(caplog):
    model, _ = _bn_chain_and_calib()
    with pytest.raises(ConfigError, match="recalibrate_bn=True needs calibration data"):
        prune(copy.deepcopy(model), torch.randn(1, 1, 10, 10), criterion="l1", ratio=0.5, recalibrate_bn=True)
    with caplog.at_level("WARNING"):
        report = prune(model, torch.randn(1, 1, 10, 10), criterion="l1", ratio=0.5)
    assert report.bn_recalibration == {"skipped": "no calib_data"}
    assert "prunekit.recalibrate_bn(model, batches)" in caplog.text


def test_mean_compensation_into_batchnorm_agrees_with_the_recalibrated_statistics():
    """The removed channels' means folded into BN2's running mean are what recalibration re-estimates: the two do
    the same job there, so recalibration keeps (does not undo) the compensation."""
    model, calib = _bn_chain_and_calib()
    folded, recal = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(1, 1, 10, 10)
    prune(folded, x, criterion="variance", ratio=0.5, only=["conv1"], calib_data=calib, compensate="mean",
          recalibrate_bn=False)
    prune(recal, x, criterion="variance", ratio=0.5, only=["conv1"], calib_data=calib, compensate="mean")
    plain = copy.deepcopy(model)
    prune(plain, x, criterion="variance", ratio=0.5, only=["conv1"], calib_data=calib, compensate="none",
          recalibrate_bn=False)
    shift = (model.bn2.running_mean - plain.bn2.running_mean).abs().max()
    assert shift == 0  # without compensation nothing moves the stale mean ...
    moved = (model.bn2.running_mean - recal.bn2.running_mean).abs().max()
    assert moved > 1e-2  # ... recalibration moves it, and the fold predicted where to:
    torch.testing.assert_close(folded.bn2.running_mean, recal.bn2.running_mean, rtol=0, atol=1e-3)


def test_a_one_pass_iterator_feeds_both_the_statistics_and_the_recalibration():
    model, calib = _bn_chain_and_calib()
    report = prune(model, torch.randn(1, 1, 10, 10), criterion="variance", ratio=0.5, only=["conv1"],
                   calib_data=iter(calib), compensate="mean", calib_batches=3)
    assert report.bn_recalibration == {"layers": 2, "batches": 3}


def test_deadline_turns_a_runaway_block_into_a_pruning_error():
    from prunekit.pruning.structured.graph import deadline

    t = time.perf_counter()
    with pytest.raises(PruningError, match="grouping took too long"):
        with deadline(1, "grouping took too long"):
            while True:
                pass
    assert time.perf_counter() - t < 5


def test_a_group_torch_pruning_cannot_finish_is_left_whole_with_a_warning(monkeypatch, caplog):
    """torch-pruning's group search runs away on a few graphs (Swin's last stage): that root keeps its channels,
    the others are pruned, and the warning names it."""
    import torch_pruning as tp

    from prunekit.pruning.structured import graph as graph_mod

    torch.manual_seed(0)
    model = ResToy().eval()
    monkeypatch.setattr(graph_mod, "GROUP_ROOT_TIMEOUT_S", 1)
    real = tp.DependencyGraph.get_pruning_group

    def runaway(self, module, fn, idxs):
        if module is model.conv1:
            while True:  # never returns, like torch-pruning on Swin's last stage
                time.sleep(0.05)
        return real(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", runaway)
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING"):
        report = prune(model, x, "l1", ratio=0.5)
    assert report.left_whole == {"conv1": "runaway group search"}
    assert model.conv1.out_channels == 16  # stuck root: whole
    assert model.stem[0].out_channels == 4  # the residual stream group: pruned
    assert "conv1" in caplog.text and "keep their output channels" in caplog.text
    assert model(x).shape == (2, 5)


def wide_inner() -> ResToy:
    """A narrow stream (4 channels) and a wide interior (64): the interior's group lists about 6x as many index
    entries as the stream's, and fewer dependencies (8 vs 22)."""
    return ResToy(stream=4, inner=64).eval()


def test_a_group_past_the_index_budget_is_left_whole_and_the_same_on_every_run(monkeypatch, caplog):
    """The budget, not the clock, stops torch-pruning's runaway groups: the same roots are left whole however busy
    the machine is (ranks of a torchrun job must prune the same channels)."""
    from prunekit.pruning.structured.graph import PruningGraph

    monkeypatch.setattr(PruningGraph, "group_budget", lambda self: (300, 10**6))  # stream: 88 entries, interior: 512
    x = torch.randn(2, 3, 8, 8)
    kept = []
    for _ in range(2):
        torch.manual_seed(0)
        model = wide_inner()
        with caplog.at_level("WARNING"):
            prune(model, x, "l1", ratio=0.5)
        assert model(x).shape == (2, 5)
        kept.append((model.stem[0].out_channels, model.conv1.out_channels))
    assert kept[0] == kept[1] == (2, 64)  # the stream is pruned, the interior (over budget) is whole
    assert "conv1" in caplog.text and "past 300 index entries" in caplog.text
    caplog.clear()

    # the dependency count is the other bound: the stream's group adds 22 dependencies, the interior's 8
    torch.manual_seed(0)
    model = wide_inner()
    monkeypatch.setattr(PruningGraph, "group_budget", lambda self: (10**9, 12))
    with caplog.at_level("WARNING"):
        report = prune(model, x, "l1", ratio=0.5)
    # the stream group has two roots (stem.0 and conv2): both are named
    assert report.left_whole == {"stem.0": "runaway group search", "conv2": "runaway group search"}
    assert "2 groups left whole" in report.summary()
    assert (model.stem[0].out_channels, model.conv1.out_channels) == (4, 32)
    assert "stem.0" in caplog.text and "12 dependencies" in caplog.text

    import torch_pruning as tp

    assert tp.dependency.group.Group.add_dep.__name__ == "add_dep"  # torch-pruning left as it was


class DeepConcat(nn.Module):
    """``h = h + relu(h)`` ten times, then a concat: torch-pruning's channel inference walks 2^10 paths back from
    the concat, more than its default budget of 500 steps (what makes torchvision's Swin-S/B fail to trace)."""

    def __init__(self, blocks: int = 10):
        super().__init__()
        self.blocks = blocks
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc1(x)
        for _ in range(self.blocks):
            h = h + torch.relu(h)
        return self.fc3(torch.cat([h, self.fc2(x)], dim=1))


def test_deep_stacks_before_a_concat_trace_with_a_larger_shape_inference_budget(monkeypatch):
    import sys

    import torch_pruning as tp

    from prunekit.pruning.structured import graph as graph_mod

    x = torch.randn(2, 8)
    steps, stack = tp.dependency.constants.MAX_RECURSION_DEPTH, sys.getrecursionlimit()
    torch.manual_seed(0)
    model = DeepConcat().eval()
    prune(model, x, "l1", ratio=0.5)
    assert model.fc1.out_features < 16 and model.fc3.in_features == model.fc1.out_features + model.fc2.out_features
    assert model(x).shape == (2, 4)
    assert (tp.dependency.constants.MAX_RECURSION_DEPTH, sys.getrecursionlimit()) == (steps, stack)  # restored

    monkeypatch.setattr(graph_mod, "SHAPE_INFERENCE_STEPS", 500)  # torch-pruning's own budget: cannot trace
    with pytest.raises(PruningError, match="could not trace DeepConcat"):
        prune(DeepConcat().eval(), x, "l1", ratio=0.5)


def test_a_group_mapped_past_a_layers_size_is_left_whole_with_a_warning(monkeypatch, caplog):
    """torch-pruning's mapping is inconsistent on a few graphs (timm ReXNet): an index past a layer's end would
    crash the scoring with an IndexError; that group keeps its channels, the rest is pruned."""
    import torch_pruning as tp
    from torch_pruning._helpers import GroupItem

    torch.manual_seed(0)
    model = ResToy().eval()
    real = tp.DependencyGraph.get_pruning_group

    def inconsistent(self, module, fn, idxs):
        group = real(self, module, fn, idxs)
        if module is model.conv1 and len(idxs) == 16:  # the full group, as graph.groups() builds it
            dep, ids = group._group[-1]
            group._group[-1] = GroupItem(dep=dep, idxs=[*ids, 999])
        return group

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", inconsistent)
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING"):
        report = prune(model, x, "l1", ratio=0.5)
    assert report.left_whole == {"conv1": "indices past a layer's size"}
    assert model.conv1.out_channels == 16 and model.stem[0].out_channels == 4
    assert "conv1" in caplog.text and "past the size of one of their layers" in caplog.text
    assert model(x).shape == (2, 5)


class HardReshape(nn.Module):
    """conv1's 16 channels are read through a reshape with a hard-coded size: pruning them breaks the forward."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv1(torch.relu(self.conv0(x)))
        return self.fc(x.reshape(x.shape[0], 16, 64).mean(-1))


def test_a_group_whose_pruning_breaks_the_forward_is_left_whole_with_a_warning(caplog):
    torch.manual_seed(0)
    model = HardReshape().eval()
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level("WARNING"):
        report = prune(model, x, "l1", ratio=0.5)
    assert report.left_whole == {"conv1": "breaks the forward pass"}
    assert model.conv1.out_channels == 16 and model.conv0.out_channels == 4
    assert "conv1" in caplog.text and "breaks the forward pass" in caplog.text
    assert model(x).shape == (2, 5)
