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
    """conv1 (16 ch, 12 dead) -> conv2 (8 ch, each the only carrier of half a class logit) -> pool -> fc1 (16 units,
    8 dead) -> fc2 (4 classes: logit k = channel 2k - channel 2k+1).

    L1 removes dead channels first, so pruning conv1 or fc1 costs nothing until live channels go; every conv2
    channel feeds one class logit alone, so removing any of them moves the argmax: conv2 is the fragile group.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc1, self.fc2):
                m.weight.zero_()
                m.bias.zero_()
            self.conv1.weight[:4] = torch.randn(4, 1, 3, 3, generator=g)  # 12 dead output channels
            self.conv2.weight[:, :4] = torch.randn(8, 4, 3, 3, generator=g)  # reads the live channels only
            self.fc1.weight[:8] = torch.eye(8)  # passes the 8 (non-negative) channel means on; 8 dead units
            # logit k = standardised (channel 2k - channel 2k+1): the four classes are about equally frequent
            x = torch.randn(512, 1, 8, 8, generator=g)
            f = self.pool(self.relu(self.conv2(self.relu(self.conv1(x))))).flatten(1)  # (N, 8)
            d = f[:, 0::2] - f[:, 1::2]  # (N, 4)
            mu, sd = d.mean(0), d.std(0)
            for k in range(4):
                self.fc2.weight[k, 2 * k], self.fc2.weight[k, 2 * k + 1] = 1 / sd[k], -1 / sd[k]
            self.fc2.bias.copy_(-mu / sd)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.pool(x).flatten(1))))


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
    assert {g["name"] for g in res["groups"]} == {"conv1", "conv2", "fc1"}
    (top, top_drop), *rest = most_sensitive(res, 3)
    assert top == "conv2"
    assert all(top_drop > d for _, d in rest)
    by = {g["name"]: {x["ratio"]: x for x in g["results"]} for g in res["groups"]}
    # dead channels go first: nothing is lost while only dead channels are removed (4 live of 16 in conv1, 8 in fc1)
    for name, safe in (("conv1", (0.1, 0.3, 0.5, 0.7)), ("fc1", (0.1, 0.3, 0.5))):
        for r in safe:
            assert by[name][r]["drop"] == 0.0, (name, r)
            assert by[name][r]["kept"] == round(16 * (1 - r))
        assert by[name][0.9]["drop"] > 0  # keep 2 of 16: live channels go too
    assert all(by["conv2"][r]["drop"] > 5.0 for r in (0.1, 0.3, 0.5, 0.7, 0.9))
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
            rep = prune(m, x, "l1", ratio=row["ratio"], scope="local", only=[g["regex"]])
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
    prune(m, torch.randn(1, 1, 8, 8), "taylor", ratio=0.5, scope="local", only=[g["regex"]], calib_data=val,
          calib_batches=2, compensate="none")  # sensitivity measures the pruning alone
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


@pytest.fixture
def tiny_run(tmp_path):
    """An (untrained) smallcnn run directory on digits, made by hand: the CLI only needs the run files."""
    import prunekit
    from prunekit import runs

    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10, width=8)
    model.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 16, 16]}
    d = tmp_path / "base"
    runs.save_model(d, model)
    runs.write_config(d, {"dataset": "digits", "data_dir": None, "image_size": 16})
    runs.write_metrics(d, {"top1": 10.0, "macs": 1, "params": 1, "stage": "train"})
    (d / runs.LOG).write_text("")
    return d


def test_cli(tiny_run, tmp_path, capsys):
    from prunekit.cli.main import main

    out = tmp_path / "sens"
    rc = main(["sensitivity", "--from", str(tiny_run), "--ratios", "0.25,0.75", "--val-samples", "96",
               "--calib-batches", "1", "--batch-size", "48", "--out", str(out)])
    assert rc == 0
    res = read_sensitivity(out)
    assert res["samples"] == 96 and res["ratios"] == [0.25, 0.75] and res["recalibrate_bn"] is True
    assert res["from"] == str(tiny_run) and res["model"] == "smallcnn" and res["dataset"] == "digits"
    assert {g["name"] for g in res["groups"]} >= {"features.0", "features.3"}
    assert all(len(g["results"]) == 2 for g in res["groups"])
    assert "most sensitive" in capsys.readouterr().out
    assert main(["sensitivity", "--from", str(tiny_run), "--ratios", "0.5", "--val-samples", "48",
                 "--calib-batches", "1", "--no-recalibrate-bn"]) == 0
    assert read_sensitivity(tiny_run / "sensitivity")["recalibrate_bn"] is False  # default --out: FROM/sensitivity
    capsys.readouterr()
    assert main(["sensitivity", "--from", str(tiny_run), "--ratios", "0.5,1.5"]) == 2
    assert "--ratios" in capsys.readouterr().err
    assert main(["sensitivity", "--from", str(tiny_run), "--criterion", "l7"]) == 2
    assert "unknown criterion 'l7'" in capsys.readouterr().err


def test_prune_with_sensitivity_caps_each_group(tiny_run, tmp_path, capsys):
    from prunekit import runs
    from prunekit.cli.main import main
    from prunekit.report.sensitivity import ratio_caps

    sens = tmp_path / "sens"
    assert main(["sensitivity", "--from", str(tiny_run), "--ratios", "0.25,0.5,0.75", "--val-samples", "96",
                 "--calib-batches", "1", "--batch-size", "48", "--out", str(sens)]) == 0
    caps = ratio_caps(sens, 0.5)
    out = tmp_path / "pruned"
    assert main(["prune", "--from", str(tiny_run), "--criterion", "l1", "--ratio", "0.6", "--scope", "local",
                 "--sensitivity", str(sens), "--max-drop", "0.5", "--out", str(out)]) == 0
    before, after = runs.load_model(tiny_run), runs.load_model(out)
    for g in read_sensitivity(sens)["groups"]:
        layer = g["name"]
        c0 = before.get_submodule(layer).weight.shape[0]
        c1 = after.get_submodule(layer).weight.shape[0]
        assert (c0 - c1) / c0 <= min(0.6, caps[g["regex"]]) + 1e-9, (layer, c0, c1, caps[g["regex"]])


def test_ratio_caps_of_zero_leave_the_group_alone():
    import torch
    from torch import nn

    from prunekit.pruning import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    report = prune(model, torch.randn(1, 1, 9, 9), criterion="l1", ratio=0.5, scope="local",
                   ratio_caps={"0": 0.0, "2": 0.25})
    assert model[0].out_channels == 8 and model[2].out_channels == 6  # untouched; capped at 25%
    assert [g.name for g in report.groups] == ["2"]
    with pytest.raises(Exception, match="ratio_caps"):
        prune(model, torch.randn(1, 1, 9, 9), criterion="l1", ratio=0.5, ratio_caps={"nothing_here": 0.5})
