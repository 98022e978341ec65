"""VBP bias compensation: consumers' mean outputs are kept (Linear exactly, convs at interior positions, BN fold
exact), concat/flatten index maps, lstsq refits, deepcopy, and the errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning import prune
from prunekit.pruning.structured.compensation import Compensator
from prunekit.pruning.structured.stats import collect_stats


class MLP(nn.Module):
    def __init__(self, d: int = 6, h: int = 12, o: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, o)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvPair(nn.Module):
    """conv1 -> ReLU -> conv2 (3x3, zero padding) [-> BN]."""

    def __init__(self, bias: bool = True, bn: bool = False, k2: int = 3, k1: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, k1, padding=k1 // 2)
        self.conv2 = nn.Conv2d(8, 5, k2, padding=k2 // 2, bias=bias)
        self.bn = nn.BatchNorm2d(5) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(F.relu(self.conv1(x) + 0.3)))


def _mean_out(model: nn.Module, batches: list, key: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        outs = [model(**b) if isinstance(b, dict) else model(b) for b in batches]
    if key == "tokens":  # mean over the real tokens only
        rows = [o[b["attention_mask"].bool()] for o, b in zip(outs, batches)]
        return torch.cat(rows).double().mean(0)
    return torch.cat([o.double() for o in outs]).mean(0)


def _pruned(model: nn.Module, x, batches, compensate: str, **kw):
    m = copy.deepcopy(model).eval()
    report = prune(m, x, "variance", ratio=0.5, calib_data=batches, compensate=compensate, **kw)
    return m, report


def test_linear_consumer_mean_output_unchanged():
    model = MLP().eval()
    batches = [torch.randn(16, 6) + 0.5 for _ in range(3)]
    dense = _mean_out(model, batches)
    comp, report = _pruned(model, batches[0], batches, "mean")
    plain, _ = _pruned(model, batches[0], batches, "none")
    assert comp.fc1.out_features == 6 and report.compensation[0]["name"] == "fc2"
    assert report.compensation[0]["into"] == "bias" and report.compensation[0]["channels"] == 6
    torch.testing.assert_close(_mean_out(comp, batches), dense, rtol=0, atol=1e-5)
    assert (_mean_out(plain, batches) - dense).abs().max() > 1e-2  # without compensation it moves


def test_token_mean_unchanged_with_padding_mask():
    model = MLP().eval()
    batches = []
    for t in (5, 7):
        mask = (torch.arange(t) < torch.randint(2, t + 1, (4, 1))).long()
        x = torch.randn(4, t, 6)
        x[mask == 0] = 50.0  # padded positions carry junk
        batches.append({"x": x, "attention_mask": mask})
    dense = _mean_out(model, batches, "tokens")
    comp, _ = _pruned(model, batches[0], batches, "mean")
    torch.testing.assert_close(_mean_out(comp, batches, "tokens"), dense, rtol=0, atol=1e-5)


def test_conv_consumer_mean_unchanged_at_interior_positions():
    # spatially constant images and a 1x1 conv1: conv2's input is stationary, so at every interior position the
    # kernel summed over space times the channel mean is exactly the dense mean; zero padding breaks the borders
    model = ConvPair(k1=1).eval()
    batches = [torch.randn(16, 3, 1, 1).expand(16, 3, 6, 6) for _ in range(3)]
    dense = _mean_out(model, batches)  # (C, H, W): mean over samples per position
    comp, report = _pruned(model, batches[0], batches, "mean")
    got = _mean_out(comp, batches)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(got[inner], dense[inner], rtol=0, atol=1e-5)
    assert (got - dense)[:, 0, :].abs().max() > 1e-3  # borders differ (documented)
    assert report.compensation[0]["into"] == "bias"


def test_bn_fold_is_the_exact_equivalent_of_a_bias():
    torch.manual_seed(1)
    with_bn = ConvPair(bias=False, bn=True).eval()
    with_bn.bn.running_mean.uniform_(-1, 1)
    with_bn.bn.running_var.uniform_(0.5, 2)
    with_bias = ConvPair(bias=True, bn=True).eval()
    with_bias.load_state_dict({**with_bn.state_dict(), "conv2.bias": torch.zeros(5)})
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    a, ra = _pruned(with_bn, batches[0], batches, "mean")
    b, rb = _pruned(with_bias, batches[0], batches, "mean")
    assert ra.compensation[0]["into"] == "bn.running_mean" and a.conv2.bias is None
    assert rb.compensation[0]["into"] == "bias"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_concat_consumer_uses_each_dependency_offset():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fa, self.fb, self.fc = nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(9, 3)

        def forward(self, x):
            return self.fc(torch.cat([F.relu(self.fa(x) + 0.5), F.relu(self.fb(x) + 0.5)], dim=-1))

    model = Cat().eval()
    batches = [torch.randn(32, 6) for _ in range(2)]
    dense = _mean_out(model, batches)
    comp, report = _pruned(model, batches[0], batches, "mean", scope="local")
    assert comp.fc.in_features < 9 and {r["name"] for r in report.compensation} == {"fc"}
    torch.testing.assert_close(_mean_out(comp, batches), dense, rtol=0, atol=1e-5)


def test_flatten_consumer_gets_every_position_of_a_channel():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 4 * 4, 3)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).flatten(1))

    model = Flat().eval()
    batches = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    dense = _mean_out(model, batches)
    comp, report = _pruned(model, batches[0], batches, "mean")
    assert comp.fc.in_features == 3 * 16 and report.compensation[0]["channels"] == 3 * 16
    torch.testing.assert_close(_mean_out(comp, batches), dense, rtol=0, atol=1e-5)


def _correlated_batches(n: int, d: int = 8, rank: int = 3, seed: int = 0, rows: int = 64,
                        noise: float = 0.1) -> list[torch.Tensor]:
    mix = torch.randn(rank, d, generator=torch.Generator().manual_seed(0))  # one distribution for every call
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, rank, generator=g) @ mix + noise * torch.randn(rows, d, generator=g) for _ in range(n)]


def test_lstsq_beats_mean_on_correlated_features_and_keeps_the_mean():
    torch.manual_seed(0)
    model = MLP(d=8, h=24, o=6).eval()
    calib, held_out = _correlated_batches(4, seed=1), _correlated_batches(2, seed=2)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in held_out])
    err = {}
    for mode in ("mean", "lstsq"):
        m, report = _pruned(model, calib[0], calib, mode)
        with torch.no_grad():
            err[mode] = (torch.cat([m(x) for x in held_out]) - ref).square().mean().item()
        assert report.compensation[0]["mode"] == mode
        torch.testing.assert_close(_mean_out(m, calib), _mean_out(model, calib), rtol=0, atol=1e-5)
    assert err["lstsq"] < 0.25 * err["mean"], err


def _prune_direct(model: nn.Module, layer: nn.Module, idxs: list[int], comp: Compensator, x: torch.Tensor) -> list:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    pruner = dg.get_pruner_of_module(layer)
    group = dg.get_pruning_group(layer, pruner.prune_out_channels, idxs)
    records = comp.apply(group, idxs)
    group.prune()
    return records


def test_lstsq_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    class Linear2(nn.Module):  # no activation: the 8 hidden channels span a 3-dim space
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    model = Linear2().eval().double()
    batches = [torch.randn(50, 3, dtype=torch.float64) for _ in range(2)]
    stats = collect_stats(model, batches, ["fc1"], covariance=True)
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    records = _prune_direct(model, model.fc1, [0, 2, 5, 7], Compensator(model, "lstsq", stats, ridge=1e-10), x)
    assert records[0]["mode"] == "lstsq" and records[0]["weight_change"] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_lstsq_on_1x1_conv_and_patches_of_kxk_conv():
    for k2 in (1, 3):
        model = ConvPair(k2=k2).eval()
        batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
        _, report = _pruned(model, batches[0], batches, "lstsq")
        rec = report.compensation[0]
        assert rec["mode"] == "lstsq" and rec["features"] == ("channels" if k2 == 1 else "patches"), rec


class _RankConv(nn.Module):
    """conv1 (1x1, no bias, no activation): 8 channels spanning 3 dims; conv2 3x3 with zero padding reads them.
    Each removed channel's patch is a combination of the kept channels' patches (borders included)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def test_lstsq_on_kxk_conv_patches_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    torch.manual_seed(0)
    model = _RankConv().eval().double()
    batches = [torch.randn(6, 3, 7, 7, dtype=torch.float64) for _ in range(2)]
    stats = collect_stats(model, batches, ["conv1"], covariance=True)
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    mean_model = copy.deepcopy(model)
    records = _prune_direct(model, model.conv1, [0, 2, 5, 7], Compensator(model, "lstsq", stats, ridge=1e-10), x)
    assert records[0]["mode"] == "lstsq" and records[0]["features"] == "patches"
    _prune_direct(mean_model, mean_model.conv1, [0, 2, 5, 7], Compensator(mean_model, "mean", stats), x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
        assert (mean_model(x) - want).abs().max() > 0.1  # the mean alone cannot do it


def test_lstsq_falls_back_to_mean_for_a_kxk_conv_too_wide_for_patches(monkeypatch):
    import prunekit.pruning.structured.stats as stats_mod

    monkeypatch.setattr(stats_mod, "MAX_PATCH_FEATURES", 8 * 9 - 1)  # conv2's 8 x 3 x 3 patch no longer fits
    model = ConvPair(k2=3).eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    _, report = _pruned(model, batches[0], batches, "lstsq")
    assert [r["mode"] for r in report.compensation] == ["mean"], report.compensation


def test_compensating_a_deep_copy_with_the_originals_stats():
    model = MLP().eval()
    batches = [torch.randn(16, 6) for _ in range(2)]
    stats = collect_stats(model, batches, ["fc1"])
    before = copy.deepcopy(model.state_dict())
    twin, again = copy.deepcopy(model), copy.deepcopy(model)
    _prune_direct(twin, twin.fc1, [1, 3, 4], Compensator(twin, "mean", stats), batches[0])
    _prune_direct(again, again.fc1, [1, 3, 4], Compensator(again, "mean", collect_stats(again, batches, ["fc1"])),
                  batches[0])
    torch.testing.assert_close(twin.fc2.bias, again.fc2.bias, rtol=0, atol=0)
    for k, v in model.state_dict().items():  # the original is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
def test_compensation_errors_name_the_layer():
    model = MLP().eval()
    batches = [torch.randn(16, 6)]
    with pytest.raises(ConfigError, match="compensate='median'.*none, mean, lstsq"):
        Compensator(model, "median", {})
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune(copy.deepcopy(model), batches[0], "l1", ratio=0.5, compensate="mean")
    no_inputs = collect_stats(model, batches, ["fc1"], inputs=False, points={"fc1": "fc1"})
    with pytest.raises(PruningError, match="'fc1'.*fc2 \\(no statistics of its input\\)"):
        _prune_direct(model, model.fc1, [0], Compensator(model, "mean", no_inputs), batches[0])
    wide = MLP(h=16).eval()
    wrong = collect_stats(wide, batches, ["fc1"])
    with pytest.raises(PruningError, match="input of 'fc2' describe 16 channels.*12 input channels"):
        _prune_direct(model, model.fc1, [0], Compensator(model, "mean", wrong), batches[0])

    class NoConsumer(nn.Module):  # fc1's channels only meet an element-wise scale and a sum
        def __init__(self):
            super().__init__()
            self.fc1, self.scale = nn.Linear(6, 5), nn.Parameter(torch.ones(5))

        def forward(self, x):
            return (F.relu(self.fc1(x)) * self.scale).sum(-1, keepdim=True)

    lone = NoConsumer().eval()
    lone_stats = collect_stats(lone, batches, ["fc1"])
    with pytest.raises(PruningError, match="from 'fc1' can be compensated \\(no conv, linear or grouped-conv layer"):
        _prune_direct(lone, lone.fc1, [0], Compensator(lone, "mean", lone_stats), batches[0])


def test_auto_ridge_is_cross_validated_and_generalises_with_scarce_data():
    torch.manual_seed(0)
    model = MLP(d=8, h=24, o=6).eval()
    calib = _correlated_batches(3, seed=3, rows=10, noise=1.0)  # 30 noisy samples for 24 features
    held_out = _correlated_batches(2, seed=4, noise=1.0)
    stats = collect_stats(model, calib, ["fc1"], covariance=True)
    assert stats.inputs["fc2"].halves is not None and stats.inputs["fc2"].halves[0].count == 20
    with torch.no_grad():
        ref = torch.cat([model(x) for x in held_out])
    err, ridges = {}, {}
    idxs = stats["fc1"].var.argsort()[:12].tolist()
    for ridge in ("auto", 1e-6):
        m = copy.deepcopy(model)
        rec = _prune_direct(m, m.fc1, idxs, Compensator(m, "lstsq", stats, ridge=ridge), calib[0])
        ridges[ridge] = rec[0]["ridge"]
        with torch.no_grad():
            err[ridge] = (torch.cat([m(x) for x in held_out]) - ref).square().mean().item()
    assert ridges["auto"] >= 0.05 and err["auto"] < 0.8 * err[1e-6], (ridges, err)


COMP_LOG = "prunekit.pruning.structured.compensation"


@pytest.mark.parametrize("n_batches, warns", [(3, True), (5, False)])
def test_lstsq_warns_with_too_few_calibration_tokens_and_names_the_need(caplog, n_batches, warns):
    """fc2 reads 12 features: a stable refit wants TOKENS_PER_FEATURE (4) x 12 = 48 tokens; 30 warn, 80 do not."""
    from prunekit.pruning.structured.compensation import TOKENS_PER_FEATURE

    torch.manual_seed(0)
    model = MLP(d=6, h=12).eval()
    rows = 10 if warns else 16
    batches = [torch.randn(rows, 6) for _ in range(n_batches)]
    with caplog.at_level(logging.WARNING, logger=COMP_LOG):
        _pruned(model, batches[0], batches, "lstsq", calib_batches=n_batches)
    msgs = [r.getMessage() for r in caplog.records if r.name == COMP_LOG and "calibration samples" in r.message]
    assert TOKENS_PER_FEATURE == 4
    if warns:
        assert len(msgs) == 1, msgs
        assert "'fc2'" in msgs[0] and "30 calibration samples" in msgs[0] and "12 input features" in msgs[0]
        assert "needs about 48" in msgs[0] and "compensate='mean'" in msgs[0], msgs[0]
    else:
        assert msgs == []


def test_mean_compensation_does_not_warn_about_lstsq_sizes(caplog):
    torch.manual_seed(0)
    batches = [torch.randn(10, 6) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger=COMP_LOG):
        _pruned(MLP(d=6, h=12).eval(), batches[0], batches, "mean", calib_batches=3)
    assert not [r for r in caplog.records if "calibration samples" in r.getMessage()]


def test_auto_ridge_falls_back_to_mean_when_no_refit_generalises():
    """Independent inputs (identity fc1, elementwise GELU): the kept channels say nothing about the removed ones, so
    any refit only fits noise; cross-validation must choose no refit (ridge inf), i.e. exactly ``mean``."""
    torch.manual_seed(0)
    model = MLP(d=12, h=12, o=4).eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(12))
        model.fc1.bias.fill_(1.0)
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(12, 12, generator=g) for _ in range(4)]  # 48 samples, 12 features
    stats = collect_stats(model, calib, ["fc1"], covariance=True)
    idxs = [0, 2, 4, 6, 8, 10]
    m_l, m_m = copy.deepcopy(model), copy.deepcopy(model)
    rec = _prune_direct(m_l, m_l.fc1, idxs, Compensator(m_l, "lstsq", stats), calib[0])
    _prune_direct(m_m, m_m.fc1, idxs, Compensator(m_m, "mean", stats), calib[0])
    assert rec[0]["mode"] == "mean" and rec[0]["ridge"] == float("inf"), rec
    torch.testing.assert_close(m_l.fc2.weight, m_m.fc2.weight, rtol=0, atol=0)
    torch.testing.assert_close(m_l.fc2.bias, m_m.fc2.bias, rtol=1e-6, atol=1e-6)


class GroupedConsumer(nn.Module):
    """conv1 -> ReLU -> a grouped 3x3 conv2 (2 groups, no padding) -> spatial mean -> fc (RegNet / ResNeXt style)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=0, groups=2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(F.relu(self.conv1(x))).mean((2, 3)))


def test_grouped_conv_consumer_gets_mean_compensation_per_group():
    """Channels 0, 1, 4, 5 of conv1 are constant after the ReLU (zero weights, a bias): the variance criterion takes
    them, and a grouped conv2 reading them keeps every output exactly when each group's kernels, summed, fold the
    means into the bias; conv2's own removed outputs go to fc as means, so the mean output is exact too."""
    torch.manual_seed(0)
    model = GroupedConsumer().eval()
    with torch.no_grad():
        for c in (0, 1, 4, 5):
            model.conv1.weight[c] = 0
            model.conv1.bias[c] = 0.5 + c / 10
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    dense = _mean_out(model, batches)
    comp, report = _pruned(model, batches[0], batches, "mean")
    plain, _ = _pruned(model, batches[0], batches, "none")
    assert comp.conv1.out_channels == 4 and comp.conv2.groups == 2
    assert {r["name"]: r["channels"] for r in report.compensation} == {"conv2": 4, "fc": 2}
    torch.testing.assert_close(_mean_out(comp, batches), dense, rtol=0, atol=1e-5)
    assert (_mean_out(plain, batches) - dense).abs().max() > 0.1
    lsq, report = _pruned(model, batches[0], batches, "lstsq")  # no refit of a grouped conv: its mean instead
    assert {r["name"]: r["mode"] for r in report.compensation}["conv2"] == "mean"
    torch.testing.assert_close(_mean_out(lsq, batches), dense, rtol=0, atol=1e-4)


def test_a_group_nothing_can_compensate_is_left_whole_and_the_rest_is_pruned(monkeypatch, caplog):
    """fc2's group (read by fc3) finds no statistics: that group stays whole with a warning naming it, and fc1's
    group is pruned and compensated; with fc2's group alone the call fails and leaves the model as it was."""
    from prunekit.pruning.structured import compensation

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    real = compensation.input_stats
    monkeypatch.setattr(compensation, "input_stats", lambda st, name: None if name == "fc3" else real(st, name))
    torch.manual_seed(0)
    model = Chain().eval()
    batches = [torch.randn(16, 6) for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        report = prune(model, batches[0], "l1", ratio=0.5, scope="local", calib_data=batches, compensate="mean")
    assert model.fc2.out_features == 8 and model.fc1.out_features == 4
    assert "fc2" in report.left_whole and "can be compensated" in report.left_whole["fc2"]
    assert any("left unpruned" in r.getMessage() and "fc2" in r.getMessage() for r in caplog.records)
    assert [c["name"] for c in report.compensation] == ["fc2"]  # fc1's removed channels compensated in fc2

    alone = Chain().eval()
    before = {k: v.clone() for k, v in alone.state_dict().items()}
    with pytest.raises(PruningError, match="no consumer can be compensated.*model is unchanged"):
        prune(alone, batches[0], "l1", ratio=0.5, only="fc2", calib_data=batches, compensate="mean")
    assert alone.fc2.out_features == 8 and all(torch.equal(alone.state_dict()[k], v) for k, v in before.items())


def test_calibration_batches_the_model_cannot_take_are_refused_before_pruning():
    model = ConvPair().eval()  # 3 input channels
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = [torch.randn(4, 1, 6, 6)]
    for criterion in ("l1", "variance"):
        with pytest.raises(ConfigError, match=r"calib_data: the first batch does not run through the model: inputs "
                                              r"tensor\[4, 1, 6, 6\] gave RuntimeError"):
            prune(model, torch.randn(1, 3, 6, 6), criterion, ratio=0.5, calib_data=wrong)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x, v):
            return self.b(F.relu(self.a(x)) * v.mean(-1, keepdim=True))

    pair = [(torch.randn(3, 4), torch.randn(3, 8))]  # read as (inputs, labels): forward misses v
    with pytest.raises(ConfigError, match=r"a 2-tuple batch is read as \(inputs, labels\)"):
        prune(TwoIn(), (torch.randn(1, 4), torch.randn(1, 8)), "l1", ratio=0.5, calib_data=pair)
    report = prune(TwoIn(), (torch.randn(1, 4), torch.randn(1, 8)), "variance", ratio=0.5,
                   calib_data=[(pair[0],)])  # ((x, v),): one batch of two inputs
    assert report.groups


def test_ridge_selection_survives_an_eigh_that_does_not_converge(monkeypatch, caplog):
    """On a VGG without BN re-estimation float32 eigh failed to converge and the whole prune() failed: now float64 is
    tried, then the fixed ridge, and the refit still happens."""
    from prunekit.pruning.structured import compensation

    real, calls = torch.linalg.eigh, {"n": 0}

    def flaky(a, *args, **kw):
        calls["n"] += 1
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(compensation.torch.linalg, "eigh", flaky)
    torch.manual_seed(0)
    batches = [torch.randn(64, 6) for _ in range(4)]
    model, _ = _pruned(MLP(d=6, h=12).eval(), batches[0], batches, "lstsq", calib_batches=4)
    assert calls["n"] > 0 and model(batches[0]).isfinite().all()

    def broken(a, *args, **kw):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(compensation.torch.linalg, "eigh", broken)
    with caplog.at_level(logging.WARNING):
        model, _ = _pruned(MLP(d=6, h=12).eval(), batches[0], batches, "lstsq", calib_batches=4)
    assert "too degenerate to cross-validate" in caplog.text and model(batches[0]).isfinite().all()


def test_lstsq_says_too_little_data_once_per_call_worst_first(caplog):
    """Two consumers fitted on too little data (30 samples; 12 and 16 input features want 48 and 64) make ONE warning
    of the call: how many layers, each with its figures, the worst (the widest) first, and what the worst needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(10, 6) for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger=COMP_LOG):
        _pruned(model, batches[0], batches, "lstsq", calib_batches=3)
    msgs = [r.getMessage() for r in caplog.records if r.name == COMP_LOG and "stable refit" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("lstsq compensation of 2 layers is fitted on fewer calibration samples"), msgs[0]
    assert msgs[0].index("'4': 30 for 16 input features, needs about 64 (2.1x)") \
        < msgs[0].index("'2': 30 for 12 input features, needs about 48 (1.6x)"), msgs[0]
    assert "give 2.1x as much calibration data" in msgs[0] and "compensate='mean'" in msgs[0]
