"""scope="adaptive": per-group ratios from measured output damage (prunekit.pruning.structured.allocate)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError
from prunekit.pruning.structured.allocate import OutputDamage, allocate


class TwoBranch(nn.Module):
    """Two residual MLP branches; branch ``a`` is scaled down so that pruning it barely changes the output."""

    def __init__(self, quiet: float = 0.05, loud: float = 3.0):
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.b1, self.b2 = nn.Linear(8, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.a2.weight.mul_(quiet)
            self.b2.weight.mul_(loud)

    def forward(self, x):
        x = x + self.a2(torch.relu(self.a1(x)))
        return x + self.b2(torch.relu(self.b1(x)))


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 8, generator=g) for _ in range(n)]


def test_adaptive_prunes_the_quiet_branch_more_and_keeps_the_mean_ratio():
    torch.manual_seed(0)
    model, data = TwoBranch(), _data()
    rep = prunekit.prune(model, data[0][:2], "variance", ratio=0.5, scope="adaptive", calib_data=data,
                         compensate="mean")
    assert set(rep.allocation) == {"a1", "b1"}
    assert rep.allocation["a1"]["ratio"] > rep.allocation["b1"]["ratio"]
    kept = {n: after for n, (before, after) in rep.layers.items()}
    assert kept["a1"] < kept["b1"]
    assert kept["a1"] + kept["b1"] == 32  # half of the 64 channels, as ratio=0.5 asks
    for trials in (v["trials"] for v in rep.allocation.values()):
        assert [r for r, _ in trials] == [0.25, 0.5, 0.75]


def test_adaptive_damages_the_output_less_than_a_uniform_ratio():
    torch.manual_seed(0)
    dense, data = TwoBranch(quiet=0.3, loud=1.5), _data()
    damage = OutputDamage(dense, data, "cpu")
    out = {}
    for scope in ("local", "adaptive"):
        m = copy.deepcopy(dense)
        prunekit.prune(m, data[0][:2], "variance", ratio=0.5, scope=scope, calib_data=data, compensate="mean")
        out[scope] = damage(m)
    assert out["adaptive"] < out["local"]


def test_allocate_follows_the_cheapest_damage_per_channel():
    class U:
        def __init__(self, name, size):
            self.name, self.size = name, size

    units = [U("cheap", 100), U("dear", 100)]
    damage = {"cheap": [(0.25, 0.01), (0.5, 0.02), (0.75, 0.03)], "dear": [(0.25, 1.0), (0.5, 2.0), (0.75, 3.0)]}
    alloc = allocate(units, damage, 0.5)
    assert alloc["cheap"] == pytest.approx(0.75)
    assert alloc["dear"] == pytest.approx(0.25)
    # unequal sizes: the channel-weighted mean is what is held
    units = [U("big", 300), U("small", 100)]
    damage = {"big": [(0.5, 1.0), (0.75, 1.5)], "small": [(0.5, 1.0), (0.75, 1.5)]}
    alloc = allocate(units, damage, 0.5)
    assert 300 * alloc["big"] + 100 * alloc["small"] == pytest.approx(200)


def test_adaptive_bad_inputs():
    model, data = TwoBranch(), _data()
    with pytest.raises(ConfigError, match="target_macs"):
        prunekit.prune(model, data[0][:2], "l1", target_macs=0.5, scope="adaptive", calib_data=data)
    with pytest.raises(ConfigError, match="calib_data"):
        prunekit.prune(model, data[0][:2], "l1", ratio=0.5, scope="adaptive")
    with pytest.raises(ConfigError, match="adaptive"):
        prunekit.prune(model, data[0][:2], "l1", ratio=0.5, scope="everywhere", calib_data=data)


def test_allocate_between_trial_ratios_equalises_marginal_damage():
    """Quadratic damages r^2 and 2 r^2: the optimum (equal marginal damage, 2 r1 = 4 r2) is r1 = 2/3, r2 = 1/3,
    between the measured ratios 0.25 / 0.5 / 0.75."""
    class U:
        def __init__(self, name):
            self.name, self.size = name, 100

    trials = (0.25, 0.5, 0.75)
    damage = {"a": [(r, r * r) for r in trials], "b": [(r, 2 * r * r) for r in trials]}
    alloc = allocate([U("a"), U("b")], damage, 0.5)
    assert alloc["a"] == pytest.approx(2 / 3, abs=0.015)
    assert alloc["b"] == pytest.approx(1 / 3, abs=0.015)
