"""Criteria: hand-set weights with a known ranking, and scores checked against an independent computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.criteria import CalibContext, get_criterion, list_criteria
from prunekit.pruning.structured.graph import PruningGraph

C = 4  # channels of the scored layer


class Toy(nn.Module):
    """conv1 (1 -> 4) -> BN -> ReLU -> conv2 (4 -> 3) -> global pool -> fc (3 -> 2)."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(C, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3)))


def toy(bn: bool = True, scale=(1.0, 2.0, 3.0, 4.0), gamma=(1.0, 1.0, 1.0, 1.0)) -> Toy:
    torch.manual_seed(0)
    m = Toy(bn)
    with torch.no_grad():
        for c, s in enumerate(scale):
            m.conv1.weight[c] = s  # every weight of filter c is s: |row| sums are 9*s
            m.conv2.weight[:, c] = s  # column c of the consumer
        if bn:
            m.bn.weight.copy_(torch.tensor(gamma))
    return m.eval()


def conv1_group(m: nn.Module):
    g = PruningGraph(m, torch.randn(1, 1, 8, 8))
    groups = [gr for gr in g.groups() if g.name(gr[0].dep.target.module) == "conv1"]
    assert len(groups) == 1
    return groups[0]


def test_registry_lists_the_builtin_criteria():
    assert {"l1", "l2", "bn_scale", "taylor", "lamp", "fpgm", "random"} <= set(list_criteria())


def test_unknown_criterion_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown criterion 'l3'.*l1.*l2"):
        get_criterion("l3")


def test_l1_is_the_group_mean_of_absolute_sums():
    scale = (3.0, 1.0, 4.0, 2.0)
    scores = get_criterion("l1")(conv1_group(toy(scale=scale)))
    s = torch.tensor(scale)
    # mean over the group's layers: conv1 rows (9 weights each), BN gamma (1.0), conv2 columns (3 weights each)
    torch.testing.assert_close(scores, (9 * s + 1.0 + 3 * s) / 3, rtol=1e-6, atol=1e-6)
    assert scores.argsort().tolist() == [1, 3, 0, 2]


def test_l2_uses_squares():
    scale = (3.0, 1.0, 4.0, 2.0)
    scores = get_criterion("l2")(conv1_group(toy(scale=scale)))
    s = torch.tensor(scale)
    torch.testing.assert_close(scores, (9 * s**2 + 1.0 + 3 * s**2) / 3, rtol=1e-6, atol=1e-6)


def test_bn_scale_ranks_by_gamma_only():
    gamma = (0.5, -0.1, 0.9, 0.3)
    scores = get_criterion("bn_scale")(conv1_group(toy(scale=(4.0, 3.0, 2.0, 1.0), gamma=gamma)))
    torch.testing.assert_close(scores, torch.tensor(gamma).abs(), rtol=1e-6, atol=1e-6)
    assert scores.argsort().tolist() == [1, 3, 0, 2]


def test_bn_scale_without_batchnorm_is_an_error_naming_the_layer():
    with pytest.raises(PruningError, match=r"bn_scale.*'conv1'.*BatchNorm"):
        get_criterion("bn_scale")(conv1_group(toy(bn=False)))


def test_lamp_is_normalised_within_the_layer_and_keeps_the_magnitude_order():
    scores = get_criterion("lamp")(conv1_group(toy(scale=(3.0, 1.0, 4.0, 2.0))))
    assert scores.argsort().tolist() == [1, 3, 0, 2]
    assert scores.max().item() == pytest.approx(1.0)  # the largest channel: s / s


def test_fpgm_matches_distance_sums_computed_by_hand():
    torch.manual_seed(1)
    m = Toy(bn=False).eval()
    scores = get_criterion("fpgm")(conv1_group(m))
    w_out = m.conv1.weight.detach().flatten(1).pow(2)  # (4, 9): |w|^2 per weight, p=2
    w_in = m.conv2.weight.detach().transpose(0, 1).flatten(1).pow(2)  # (4, 3)
    expect = (torch.cdist(w_out, w_out).sum(0) + torch.cdist(w_in, w_in).sum(0)) / 2
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-6)


def test_random_is_seeded():
    group = conv1_group(toy())
    a, b, c = (get_criterion("random", seed=s)(group) for s in (0, 0, 1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (C,) and ((a >= 0) & (a < 1)).all()


def test_taylor_accumulates_abs_w_times_grad_over_batches():
    m = toy(scale=(0.0, 1.0, 2.0, 3.0))  # channel 0 is dead: zero weights, zero score
    torch.manual_seed(2)
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,))) for _ in range(3)]
    crit = get_criterion("taylor")
    crit.calibrate(CalibContext(model=m, example_inputs=batches[0][0], calib_data=batches))
    scores = crit(conv1_group(m))
    # independent computation: per batch |w * dL/dw| element-wise, summed over batches, per channel
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for x, y in batches:
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        for n, p in m.named_parameters():
            acc[n] += (p.detach() * p.grad).abs()
    expect = (acc["conv1.weight"].flatten(1).sum(1) + acc["bn.weight"] + acc["conv2.weight"].sum((0, 2, 3))) / 3
    torch.testing.assert_close(scores, expect, rtol=1e-5, atol=1e-7)
    assert scores[0] == 0 and scores.argmin().item() == 0
    assert crit.batches == 3


def test_taylor_without_labels_is_an_error():
    m = toy()
    crit = get_criterion("taylor")
    with pytest.raises(PruningError, match="labelled"):
        crit.calibrate(CalibContext(model=m, example_inputs=None, calib_data=[torch.randn(2, 1, 8, 8)]))


def test_taylor_restores_the_weights_and_grads():
    m = toy()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    crit = get_criterion("taylor")
    crit.calibrate(CalibContext(model=m, example_inputs=None,
                                calib_data=[(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))]))
    crit(conv1_group(m))
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
        assert p.grad is None


@pytest.mark.parametrize("criterion,kept", [("l1", [0, 2]), ("l2", [0, 2]), ("bn_scale", [1, 3]), ("lamp", [0, 2])])
def test_pruning_keeps_the_highest_scored_channels(criterion, kept):
    from prunekit.pruning import prune

    # magnitudes rank channels 0 and 2 first; BN gammas rank 1 and 3 first
    m = toy(scale=(3.0, 1.0, 4.0, 2.0), gamma=(0.1, 0.9, 0.2, 0.8))
    original = m.conv1.weight.detach().clone()
    report = prune(m, torch.randn(1, 1, 8, 8), criterion=criterion, ratio=0.5, scope="local", only=["conv1"])
    assert report.groups[0].removed == sorted(set(range(C)) - set(kept))
    torch.testing.assert_close(m.conv1.weight.detach(), original[kept], rtol=0, atol=0)
