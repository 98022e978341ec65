"""VBP criteria ``variance`` and ``variance_weighted``: hand-set rankings, the consumer-input point, the engine,
and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import prunekit
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning import CalibContext, get_criterion, list_criteria, prune
from prunekit.pruning.structured.stats import collect_stats

SCALES = torch.tensor([0.3, 2.0, 0.1, 1.0, 0.6, 1.5])  # hidden channel j = SCALES[j] * x_0 + 10


class HandSet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.weight[:, 0] = SCALES
            self.fc1.bias.fill_(10.0)  # ReLU stays linear: variance_j = SCALES[j]^2 * var(x_0)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _group(model: nn.Module, layer: nn.Module, x) -> tp.dependency.Group:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    pruner = dg.get_pruner_of_module(layer)
    return dg.get_pruning_group(layer, pruner.prune_out_channels, list(range(pruner.get_out_channels(layer))))


def _scores(name: str, model: nn.Module, layer: str, batches: list, stats=None) -> torch.Tensor:
    crit = get_criterion(name)
    ctx = CalibContext(model=model, example_inputs=batches[0], calib_data=batches, targets=[layer],
                       stats=stats if stats is not None else {})
    crit.calibrate(ctx)
    return crit(_group(model, dict(model.named_modules())[layer], batches[0]))


def test_registered_in_the_criteria_registry():
    assert {"variance", "variance_weighted"} <= set(list_criteria())
    crit = get_criterion("variance")
    assert crit.needs_data and crit.needs_stats and not crit.needs_labels


def test_variance_ranks_hand_set_channels():
    model = HandSet().eval()
    batches = [torch.randn(64, 4) for _ in range(2)]
    scores = _scores("variance", model, "fc1", batches)
    x0 = torch.cat(batches)[:, 0].double()
    torch.testing.assert_close(scores.double(), SCALES.double() ** 2 * x0.var(correction=0), rtol=1e-4, atol=1e-6)
    report = prune(model, batches[0], "variance", ratio=0.5, calib_data=batches)
    assert report.groups[0].removed == [0, 2, 4]  # the three smallest scales
    assert model.fc1.out_features == 3


def test_variance_weighted_uses_consumer_columns():
    model = HandSet().eval()
    with torch.no_grad():
        model.fc2.weight.copy_(torch.tensor([[0.01, 0.1, 1.0, 1.0, 1.0, 0.05]] * 2))
    batches = [torch.randn(64, 4) for _ in range(2)]
    stats = collect_stats(model, batches, ["fc1"])
    weighted = _scores("variance_weighted", model, "fc1", batches, stats)
    want = stats["fc1"].var * model.fc2.weight.detach().double().square().sum(0)
    torch.testing.assert_close(weighted.double(), want, rtol=1e-6, atol=1e-9)
    plain = _scores("variance", model, "fc1", batches, stats)
    assert plain.argmax() == 1 and weighted.argmax() == 3  # the widest channel (1) barely reaches the output


def test_inverted_residual_is_scored_after_the_depthwise_activation():
    class Inverted(nn.Module):  # MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1
        def __init__(self):
            super().__init__()
            self.expand, self.bn1 = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
            self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
            self.project, self.bn3 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            h = F.relu6(self.bn1(self.expand(x)))
            return x + self.bn3(self.project(F.relu6(self.bn2(self.dw(h)))))

    model = Inverted().eval()
    batches = [torch.randn(4, 4, 6, 6) for _ in range(2)]
    stats = collect_stats(model, batches, ["expand", "dw"])
    assert stats["expand"].point == "input of dw" and stats["dw"].point == "input of project"
    scores = _scores("variance", model, "expand", batches, stats)
    with torch.no_grad():
        h = torch.cat([F.relu6(model.bn2(model.dw(F.relu6(model.bn1(model.expand(b)))))) for b in batches])
    torch.testing.assert_close(scores.double(), h.double().var(dim=(0, 2, 3), correction=0), rtol=1e-4, atol=1e-7)


def test_engine_prunes_with_weighted_variance_and_lstsq():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    model.eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    report = prune(model, batches[0], "variance_weighted", ratio=0.5, calib_data=batches, compensate="lstsq")
    assert report.macs_after < report.macs_before and len(report.groups) == 2
    assert {r["name"]: r["mode"] for r in report.compensation} == {"3": "lstsq", "7": "lstsq"}


def test_criterion_errors_name_the_layer():
    model = HandSet().eval()
    batches = [torch.randn(8, 4)]
    with pytest.raises(ConfigError, match="criterion 'variance' needs calibration data"):
        prune(copy.deepcopy(model), batches[0], "variance", ratio=0.5)
    crit = get_criterion("variance")
    with pytest.raises(PruningError, match="needs calibration data"):
        crit.calibrate(CalibContext(model=model, example_inputs=batches[0], targets=["fc1"]))
    with pytest.raises(PruningError, match="no statistics for layer 'fc1'"):
        crit(_group(model, model.fc1, batches[0]))
    wider = nn.Sequential()
    wider.fc1, wider.relu, wider.fc2 = nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2)
    wrong = collect_stats(wider, batches, ["fc1"])
    with pytest.raises(PruningError, match="input of 'fc2' describe 9 channels"):
        _scores("variance", model, "fc1", batches, wrong)
    producer_only = collect_stats(model, batches, ["fc1"], inputs=False, points={"fc1": "fc1"})
    assert _scores("variance", model, "fc1", batches, producer_only).shape == (6,)  # falls back to fc1's point
    with pytest.raises(PruningError, match="group of layer 'fc1' has no conv/linear consumer with input stat"):
        _scores("variance_weighted", model, "fc1", batches, producer_only)  # no consumer input to weigh


def test_conditional_variance_matches_weighted_variance_for_uncorrelated_inputs():
    from prunekit.pruning.structured.criteria.variance import _greedy_obs

    var = torch.tensor([1.0, 4.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    scores = _greedy_obs(w, torch.diag(var), ridge=0.0)
    # independent inputs: nothing can be refit, so the order is that of ||w_j||^2 var_j (variance_weighted)
    assert scores.argsort().tolist() == (w.square().sum(0) * var).argsort().tolist()


def test_conditional_variance_removes_what_lstsq_can_rebuild():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 8, generator=g)

    def data(n: int) -> list[torch.Tensor]:
        return [torch.randn(64, 3, generator=g) @ mix + 0.1 * torch.randn(64, 8, generator=g) for _ in range(n)]

    torch.manual_seed(0)
    model = nn.Sequential()
    model.fc1, model.act, model.fc2 = nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 6)
    model.eval()
    calib, held_out = data(4), data(2)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in held_out])
    err = {}
    for crit in ("variance", "variance_conditional"):
        m = copy.deepcopy(model)
        prune(m, calib[0], crit, ratio=0.75, calib_data=calib, compensate="lstsq")
        with torch.no_grad():
            err[crit] = (torch.cat([m(x) for x in held_out]) - ref).square().mean().item()
    assert err["variance_conditional"] < 0.7 * err["variance"], err


def test_conditional_variance_of_a_kxk_conv_removes_the_channel_whose_refit_loses_least():
    """k x k consumers: a channel is a block of k*k patch features; the first channel greedy OBS removes is the one
    whose removal, with every other weight refit by least squares, leaves the least output error (brute force)."""
    from prunekit.pruning.structured.criteria.variance import _greedy_obs

    g = torch.Generator().manual_seed(0)
    c, k2, o = 5, 4, 3
    x = torch.randn(400, c * k2, generator=g, dtype=torch.float64) @ torch.randn(c * k2, c * k2, generator=g,
                                                                                   dtype=torch.float64)
    cov = x.T @ x / len(x)
    w = torch.randn(o, c * k2, generator=g, dtype=torch.float64)

    def refit_error(j: int) -> float:
        keep = [f for f in range(c * k2) if f // k2 != j]
        sol = torch.linalg.lstsq(x[:, keep], x @ w.T).solution
        return float((x[:, keep] @ sol - x @ w.T).square().sum() / len(x))

    scores = _greedy_obs(w, cov, ridge=0.0, k2=k2, steps=c)  # one channel per step
    errors = [refit_error(j) for j in range(c)]
    assert int(scores.argmin()) == min(range(c), key=errors.__getitem__)
    assert float(scores.min()) == pytest.approx(min(errors), rel=1e-6)


def test_conditional_variance_prunes_a_resnet_through_its_3x3_consumers():
    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10).eval()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    report = prune(model, calib[0][:1], "variance_conditional", ratio=0.4, calib_data=calib, compensate="lstsq")
    assert report.groups_pruned > 0 and report.macs_after < report.macs_before
