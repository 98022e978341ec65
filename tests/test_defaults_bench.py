"""benchmarks/defaults.py: one setting on a tiny model gives a full row; a failing setting is a row, not a crash;
the summary averages over models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import prunekit

FIELDS = {"model", "level", "criterion", "compensate", "scope", "recalibrate_bn", "target", "dense", "score",
          "retained", "macs_kept", "seconds", "error", "dense_bn"}


@pytest.fixture(scope="module")
def bench_mod():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults.py"
    spec = importlib.util.spec_from_file_location("bench_defaults", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_defaults"] = mod
    spec.loader.exec_module(mod)
    return mod


def _bench(mod, labels: bool = True, name: str = "tiny", seed: int = 0):
    torch.manual_seed(seed)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=4, width=8).eval()
    xs = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    calib = [(x, torch.randint(0, 4, (16,))) for x in xs] if labels else xs
    xt, yt = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    dense = mod.top1(model, xt, yt)
    return mod.Bench(name, model, torch.zeros(1, 1, 8, 8), calib, lambda m: mod.top1(m, xt, yt), max(dense, 1.0),
                     [dict(ratio=0.5), dict(target_macs=0.5)])


def test_one_setting_gives_a_full_row(bench_mod):
    b = _bench(bench_mod)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    row = bench_mod.run_setting(b, dict(criterion="l1", compensate="lstsq", scope="global", recalibrate_bn=True), 1)
    assert set(row) == FIELDS
    assert row["error"] is None, row["error"]
    assert 0 <= row["score"] <= 100 and row["retained"] == pytest.approx(row["score"] / b.dense, abs=1e-3)
    assert 0.4 < row["macs_kept"] < 0.6  # target_macs=0.5 of level 2
    assert row["target"] == {"target_macs": 0.5} and row["seconds"] >= 0
    for k, v in b.model.state_dict().items():  # the bench model itself is never pruned
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_failing_setting_is_a_row_with_its_error(bench_mod):
    b = _bench(bench_mod, labels=False)  # taylor needs labels
    row = bench_mod.run_setting(b, dict(criterion="taylor", compensate="none", scope="local", recalibrate_bn=True), 0)
    assert row["score"] is None and row["retained"] is None
    assert "taylor" in row["error"] and row["error"].startswith("PruningError")


def test_summary_gives_mean_and_spread_over_models(bench_mod):
    settings = bench_mod.grid(["l1", "random"], ["none"], ["global"], bn_off=False)
    assert [bench_mod.label(s) for s in settings] == ["l1 | none | global | on", "random | none | global | on"]
    benches = [_bench(bench_mod, name=n, seed=i) for i, n in enumerate(("a", "b", "c"))]
    rows = [bench_mod.run_setting(b, s, lv) for b in benches for s in settings for lv in (0, 1)]
    lines = bench_mod.summary(rows, settings)
    assert len(lines) == 2 + len(settings)
    ret = [r["retained"] for r in rows if r["criterion"] == "l1" and r["level"] == 0]
    mean = sum(ret) / len(ret)
    assert len(set(ret)) > 1, "the three models should differ"
    assert lines[2].startswith("| l1 | none | global | on | ")
    assert f"{mean:.3f} ({min(ret):.3f}-{max(ret):.3f})" in lines[2]


def test_bn_off_on_a_model_without_batchnorm_reuses_bn_on(bench_mod):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    xt, yt = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    b = bench_mod.Bench("mlp", model.eval(), torch.zeros(1, 1, 8, 8), [torch.randn(16, 1, 8, 8)] * 2,
                        lambda m: bench_mod.top1(m, xt, yt), 50.0, [dict(ratio=0.5)])
    settings = bench_mod.grid(["l1"], ["none"], ["global"], bn_off=True)
    assert [s["recalibrate_bn"] for s in settings] == [True, False]
    rows = [bench_mod.run_setting(b, s, 0) for s in settings]
    assert rows[1]["score"] is None and "no BatchNorm" in rows[1]["error"]
    lines = bench_mod.summary(rows, settings, levels=1)
    assert rows[1]["score"] == rows[0]["score"] is not None
    assert lines[2].split("|")[5] == lines[3].split("|")[5]  # same mean retained on and off
