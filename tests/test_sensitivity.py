"""Layer sensitivity: a deliberately fragile group comes out most sensitive, the fast path equals the engine's
``prune(only=...)``, ratio caps, files, the CLI and bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, RunDirError
from prunekit.pruning.structured import prune
from prunekit.report.sensitivity import (
    check_ratios,
    layer_sensitivity,
    most_sensitive,
    ratio_caps,
    read_sensitivity,
    sensitivity_csv,
    write_sensitivity,
)
from prunekit.train import evaluate


class Fragile(nn.Module):
    """conv1 (16 ch, 12 of them dead) -> conv2 (8 ch, every one carrying signal) -> conv3 (16 ch, 12 dead) -> fc.

    L1 removes the dead channels of conv1/conv3 first, so pruning them costs nothing until only live channels are
    left; every channel of conv2 matters, so conv2 is the fragile group.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.conv3, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                m.bias.zero_()
            for conv in (self.conv1, self.conv3):
                conv.weight[4:] = 0  # 12 dead output channels (zero weight, zero bias)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(self.pool(x).flatten(1))


def _data(model: nn.Module, n: int = 256, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images labelled by the model itself: the unpruned model scores 100%."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def fragile_result():
    model = Fragile()
    val = _data(model)
    return model, val, layer_sensitivity(model, torch.randn(1, 1, 8, 8), val, criterion="l1",
                                         ratios=[0.1, 0.3, 0.5, 0.7, 0.9])


def test_fragile_group_is_most_sensitive(fragile_result):
    _, _, res = fragile_result
    assert res["baseline"]["top1"] == 100.0
    assert {g["name"] for g in res["groups"]} == {"conv1", "conv2", "conv3"}
    (top, top_drop), *rest = most_sensitive(res, 3)
    assert top == "conv2"
    assert all(top_drop > d for _, d in rest)
    by = {g["name"]: {x["ratio"]: x for x in g["results"]} for g in res["groups"]}
    # dead channels go first: conv1/conv3 lose nothing while only dead channels are removed (keep >= 4 of 16)
    for name in ("conv1", "conv3"):
        for r in (0.1, 0.3, 0.5, 0.7):
            assert by[name][r]["drop"] == 0.0, (name, r)
            assert by[name][r]["kept"] == round(16 * (1 - r))
        assert by[name][0.9]["drop"] > 0  # keep 2 of 16: live channels go too
    assert by["conv2"][0.1]["drop"] > 1.0
    assert by["conv2"][0.9]["drop"] > by["conv2"][0.1]["drop"]
    # MACs kept shrink with the ratio
    assert by["conv2"][0.9]["macs_kept"] < by["conv2"][0.1]["macs_kept"] < 1.0


def test_fast_path_equals_engine_prune_only(fragile_result):
    """Each (group, ratio) equals prune(copy, only=[group regex], scope="local") evaluated on the same batches."""
    model, val, res = fragile_result
    x = torch.randn(1, 1, 8, 8)
    for g in res["groups"]:
        for row in g["results"]:
            if row["ratio"] not in (0.5, 0.9):
                continue
            m = copy.deepcopy(model)
            rep = prune(m, x, "l1", row["ratio"], scope="local", only=[g["regex"]])
            assert [gr.name for gr in rep.groups] == [g["name"]]
            got = evaluate(m, val)
            torch.testing.assert_close(got["top1"], row["top1"], rtol=0, atol=1e-9)
            torch.testing.assert_close(got["val_loss"], row["val_loss"], rtol=1e-5, atol=1e-6)
            assert rep.macs_kept == pytest.approx(row["macs_kept"], rel=1e-6)


def test_model_is_not_modified(fragile_result):
    model, _, _ = fragile_result
    ref = Fragile()
    assert model.conv2.out_channels == 8
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_data_driven_criterion_matches_engine():
    model = Fragile()
    val = _data(model, n=128)
    res = layer_sensitivity(model, torch.randn(1, 1, 8, 8), val, criterion="taylor", ratios=[0.5], calib_data=val,
                            calib_batches=2)
    g = next(g for g in res["groups"] if g["name"] == "conv2")
    m = copy.deepcopy(model)
    prune(m, torch.randn(1, 1, 8, 8), "taylor", 0.5, scope="local", only=[g["regex"]], calib_data=val,
          calib_batches=2)
    torch.testing.assert_close(evaluate(m, val)["val_loss"], g["results"][0]["val_loss"], rtol=1e-5, atol=1e-6)


def test_ratio_caps_rules():
    data = {"format": 1, "criterion": "l1", "ratios": [0.1, 0.3, 0.5], "baseline": {"top1": 90.0}, "groups": [
        {"name": "a", "regex": "a", "results": [{"ratio": 0.1, "drop": 0.2}, {"ratio": 0.3, "drop": 0.9},
                                                {"ratio": 0.5, "drop": 3.0}]},
        {"name": "b", "regex": "b|c", "results": [{"ratio": 0.1, "drop": 2.0}, {"ratio": 0.3, "drop": 0.5}]},
        {"name": "d", "regex": "d", "results": [{"ratio": 0.5, "drop": 0.1}, {"ratio": 0.1, "drop": 0.0},
                                                {"ratio": 0.3, "error": "rounds back"}]},
        {"name": "e", "regex": "e", "results": [{"ratio": 0.1, "error": "broken"}]},
    ]}
    # a: stops before 0.5; b: already too costly at the smallest ratio (a later lucky ratio does not count);
    # d: unordered rows and an untested ratio; e: nothing tested -> no cap
    assert ratio_caps(data, 1.0) == {"a": 0.3, "b|c": 0.0, "d": 0.5}
    assert ratio_caps(data, 5) == {"a": 0.5, "b|c": 0.3, "d": 0.5}
    with pytest.raises(ConfigError, match="max-drop"):
        ratio_caps(data, -1)
    with pytest.raises(ConfigError, match="max-drop"):
        ratio_caps(data, "lots")


def test_files_round_trip(fragile_result, tmp_path):
    _, _, res = fragile_result
    paths = write_sensitivity(res, tmp_path / "s")
    assert [p.name for p in paths] == ["sensitivity.json", "sensitivity.csv", "sensitivity.png"]
    assert read_sensitivity(tmp_path / "s") == json.loads(json.dumps(res))
    lines = (tmp_path / "s" / "sensitivity.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 5 and lines[0].startswith("group,channels,ratio,kept,top1")
    assert sensitivity_csv(res).splitlines() == lines
    assert (tmp_path / "s" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caps = ratio_caps(tmp_path / "s" / "sensitivity.json", 0.0)
    assert caps[next(g["regex"] for g in res["groups"] if g["name"] == "conv1")] == 0.7
    assert caps[next(g["regex"] for g in res["groups"] if g["name"] == "conv2")] == 0.0


def test_bad_inputs(tmp_path):
    model = Fragile()
    val = _data(model, n=64)
    x = torch.randn(1, 1, 8, 8)
    for bad in ([0.0, 0.5], [1.0], [], ["half"]):
        with pytest.raises(ConfigError, match="--ratios"):
            check_ratios(bad)
    assert check_ratios([0.5, 0.1, 0.5]) == [0.1, 0.5]
    with pytest.raises(ConfigError, match="unknown criterion"):
        layer_sensitivity(model, x, val, criterion="l7")
    with pytest.raises(ConfigError, match="needs calibration data"):
        layer_sensitivity(model, x, val, criterion="taylor")
    with pytest.raises(ConfigError, match="recalibrate_bn"):
        layer_sensitivity(model, x, val, recalibrate_bn=True)
    with pytest.raises(ConfigError, match="empty"):
        layer_sensitivity(model, x, [])
    with pytest.raises(ConfigError, match="matches no module"):
        layer_sensitivity(model, x, val, only=["nope"])
    with pytest.raises(RunDirError, match="does not exist"):
        read_sensitivity(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": 1, "groups": [{"name": "a"}]}')
    with pytest.raises(RunDirError, match="needs 'name', 'regex' and 'results'"):
        read_sensitivity(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"top1": 3}')
    with pytest.raises(RunDirError, match="not a prunekit sensitivity result"):
        read_sensitivity(tmp_path / "other.json")


def test_cli_on_a_trained_run(trained_run, tmp_path, capsys):
    from prunekit.cli.main import main

    out = tmp_path / "sens"
    rc = main(["sensitivity", "--from", str(trained_run), "--ratios", "0.25,0.75", "--val-samples", "96",
               "--calib-batches", "1", "--batch-size", "48", "--out", str(out)])
    assert rc == 0
    res = read_sensitivity(out)
    assert res["samples"] == 96 and res["ratios"] == [0.25, 0.75] and res["recalibrate_bn"] is True
    assert res["from"] == str(trained_run) and res["model"] == "smallcnn" and res["dataset"] == "digits"
    assert len(res["groups"]) >= 2 and all(len(g["results"]) == 2 for g in res["groups"])
    assert "most sensitive" in capsys.readouterr().out
    rc = main(["sensitivity", "--from", str(trained_run), "--ratios", "0.5,1.5"])
    assert rc == 2
    assert "--ratios" in capsys.readouterr().err
