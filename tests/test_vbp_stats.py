"""VBP channel statistics: Welford/Chan accumulation vs numpy float64, masks, layouts, points, merge, sync, deepcopy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.stats import ChannelStats, StatsDict, _pack, collect_stats, sync_stats


class MLP(nn.Module):
    def __init__(self, d: int = 6, h: int = 8, o: int = 3):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, o)

    def forward(self, x: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReusedReLU(nn.Module):
    """torchvision-style: one ReLU module called twice, BN after each conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(F.max_pool2d(x, x.shape[-1]).flatten(1))


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _np_stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.float64)
    return rows.mean(0), rows.var(0)


def _identity_mlp(c: int, dtype: torch.dtype = torch.float32) -> MLP:
    model = MLP(d=c, h=c).to(dtype)
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(c))
        model.fc1.bias.zero_()
    return model


def test_stats_match_numpy_on_offset_float32_batches():
    # [B, C] rows far from zero: a float32 sum of squares would lose every digit of the variance
    model = _identity_mlp(4)
    batches = [torch.randn(n, 4) * torch.tensor([0.5, 1.0, 2.0, 3.0]) + 1000.0 for n in (7, 1, 13, 9)]
    st = collect_stats(model, batches, ["fc1"], points={"fc1": "fc1"}, inputs=False)["fc1"]
    mean, var = _np_stats(torch.cat(batches).numpy())
    assert st.count == 30 and st.mean.dtype == st.var.dtype == torch.float64
    torch.testing.assert_close(st.mean, torch.from_numpy(mean), rtol=1e-7, atol=0)
    torch.testing.assert_close(st.var, torch.from_numpy(var), rtol=1e-4, atol=0)


def test_float64_data_is_exact():
    model = _identity_mlp(4, torch.float64)
    batches = [torch.randn(n, 4, dtype=torch.float64) * 3 + 1e4 for n in (5, 11, 2)]
    st = collect_stats(model, batches, ["fc1"], points={"fc1": "fc1"}, inputs=False)["fc1"]
    mean, var = _np_stats(torch.cat(batches).numpy())
    torch.testing.assert_close(st.mean, torch.from_numpy(mean), rtol=1e-13, atol=0)
    torch.testing.assert_close(st.var, torch.from_numpy(var), rtol=1e-9, atol=0)


def test_padded_tokens_are_excluded_from_btc_statistics():
    model = MLP(d=6, h=8)
    batches, rows = [], []
    for t in (5, 3):
        x = torch.randn(4, t, 6)
        mask = torch.ones(4, t, dtype=torch.long)
        mask[1, 2:] = 0
        mask[3, 1:] = 0
        x[mask == 0] = 1e3  # padding junk that must not leak into the statistics
        batches.append({"x": x, "attention_mask": mask})
        with torch.no_grad():
            rows.append(F.gelu(model.fc1(x))[mask.bool()])
    st = collect_stats(model, batches, ["fc1"])["fc1"]
    assert st.point == "input of fc2"
    mean, var = _np_stats(torch.cat(rows).numpy())
    assert st.count == sum(int(b["attention_mask"].sum()) for b in batches)
    torch.testing.assert_close(st.mean, torch.from_numpy(mean), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.var, torch.from_numpy(var), rtol=1e-5, atol=1e-6)
    unmasked = collect_stats(model, batches, ["fc1"], attention_mask=False)["fc1"]
    assert unmasked.count == sum(b["x"].shape[0] * b["x"].shape[1] for b in batches)
    assert unmasked.var.max() > 10 * st.var.max()  # the padding junk is in there


def test_nchw_point_after_bn_and_reused_relu_matches_manual():
    model = ReusedReLU().eval()
    _randomize_bn(model)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    stats = collect_stats(model, batches, ["conv1", "conv2"])
    assert stats["conv1"].point == "input of conv2"  # pre-hooked consumer, not the reused relu
    assert stats["conv2"].point == "output of bn2 + relu"  # BN hooked, activation applied by us
    with torch.no_grad():
        h1 = F.relu(model.bn1(model.conv1(torch.cat(batches))))
        h2 = F.relu(model.bn2(model.conv2(h1)))
    for name, h in (("conv1", h1), ("conv2", h2)):
        mean, var = _np_stats(h.permute(0, 2, 3, 1).reshape(-1, 8).numpy())
        torch.testing.assert_close(stats[name].mean, torch.from_numpy(mean), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[name].var, torch.from_numpy(var), rtol=1e-5, atol=1e-6)
        assert stats[name].count == 3 * 2 * 36
    assert stats.inputs["conv2"] is stats["conv1"]  # one point, measured once
    assert model.training is False


def test_nhwc_linear_and_point_overrides():
    class ChannelsLast(nn.Module):  # ConvNeXt-style MLP on [B, H, W, C]
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.fc2(F.silu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)

    model = ChannelsLast()
    batches = [torch.randn(2, 4, 3, 5) for _ in range(2)]
    with torch.no_grad():
        h = torch.cat([F.silu(model.fc1(b.permute(0, 2, 3, 1))) for b in batches]).reshape(-1, 6)
    mean, var = _np_stats(h.numpy())
    auto = collect_stats(model, batches, ["fc1"])["fc1"]
    by_fn = collect_stats(model, batches, ["fc1"], points={"fc1": F.silu}, inputs=False)["fc1"]
    by_name = collect_stats(model, batches, ["fc1"], points={"fc1": "fc2:input"}, inputs=False)["fc1"]
    for st in (auto, by_fn, by_name):
        torch.testing.assert_close(st.var, torch.from_numpy(var), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.mean, torch.from_numpy(mean), rtol=1e-5, atol=1e-6)
    assert auto.point == "input of fc2" and by_fn.point == "output of fc1 + silu"


def test_merge_of_halves_equals_whole_including_covariance():
    model = MLP(d=5, h=7).double()  # float64 data: merging is exact up to rounding
    batches = [torch.randn(9, 5, dtype=torch.float64) + 3 for _ in range(4)]
    whole = collect_stats(model, batches, ["fc1"], covariance=True)["fc1"]
    a = collect_stats(model, batches[:1], ["fc1"], covariance=True)["fc1"]
    b = collect_stats(model, batches[1:], ["fc1"], covariance=True)["fc1"]
    m = a.merge(b)
    assert m.count == whole.count == 36
    for got, want in ((m.mean, whole.mean), (m.var, whole.var), (m.cov, whole.cov)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(whole.cov.diagonal(), whole.var, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        h = torch.cat([F.gelu(model.fc1(x)) for x in batches])
    torch.testing.assert_close(whole.cov, torch.cov(h.T, correction=0), rtol=1e-10, atol=1e-12)


def test_sync_stats_merges_ranks_in_rank_order(monkeypatch):
    import torch.distributed as dist

    model = MLP(d=5, h=7).double()
    batches = [torch.randn(8, 5, dtype=torch.float64) - 2 for _ in range(4)]
    whole = collect_stats(model, batches, ["fc1"], covariance=True)
    mine = collect_stats(model, batches[:2], ["fc1"], covariance=True)
    other = collect_stats(model, batches[2:], ["fc1"], covariance=True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")

    def all_gather(out, flat):  # rank 0 is this process; rank 1 holds the other half
        out[0].copy_(flat)
        out[1].copy_(_pack([other["fc1"]]))

    monkeypatch.setattr(dist, "all_gather", all_gather)
    synced = sync_stats(mine)
    assert synced["fc1"] is synced.inputs["fc2"] and synced["fc1"].count == 32
    torch.testing.assert_close(synced["fc1"].var, whole["fc1"].var, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(synced["fc1"].cov, whole["fc1"].cov, rtol=1e-9, atol=1e-12)


def test_sync_is_a_noop_without_distributed():
    st = StatsDict({"a": ChannelStats(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 3)})
    assert sync_stats(st) is st and st["a"].count == 3


def test_stats_keyed_by_name_survive_deepcopy():
    model = ReusedReLU().eval()
    stats = collect_stats(model, [torch.randn(2, 3, 6, 6)], ["conv1"])
    twin_names = dict(copy.deepcopy(model).named_modules())
    assert set(stats) | set(stats.inputs) <= set(twin_names)  # names, not module objects
    copied = copy.deepcopy(stats)
    assert isinstance(copied, StatsDict) and copied.inputs["conv2"] is copied["conv1"]
    torch.testing.assert_close(copied["conv1"].var, stats["conv1"].var, rtol=0, atol=0)


def test_errors_name_the_layer():
    model = MLP()
    with pytest.raises(PruningError, match="calibration data"):
        collect_stats(model, None, ["fc1"])
    with pytest.raises(PruningError, match="no calibration batches"):
        collect_stats(model, [], ["fc1"])
    with pytest.raises(PruningError, match="'fc3'.*did you mean"):
        collect_stats(model, [torch.randn(2, 6)], ["fc3"])
    with pytest.raises(PruningError, match="points\\['fc1'\\]"):
        collect_stats(model, [torch.randn(2, 6)], ["fc1"], points={"fc1": "nowhere"})
    with pytest.raises(PruningError, match="expected 8 channels"):  # a point that does not carry fc1's channels
        collect_stats(model, [torch.randn(2, 6)], ["fc1"], points={"fc1": "fc1:input"}, inputs=False)
