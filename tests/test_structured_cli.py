"""``prunekit prune`` and ``prunekit graph`` end to end on a tiny trained run directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import prunekit
from prunekit import runs
from prunekit.cli.main import main


def test_prune_cli_writes_a_full_run_directory(trained_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", "--from", str(trained_run), "--criterion", "l1", "--ratio", "0.35", "--calib-batches", "3",
               "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.json", "config.yaml", "metrics.json",
                                               "log.txt", "prune_report.json"}
    m = runs.read_metrics(out)
    assert {"top1", "top5", "test_loss", "macs", "params", "macs_before", "params_before", "ratio",
            "criterion"} <= set(m)
    assert m["macs"] < m["macs_before"] and m["params"] < m["params_before"] and m["ratio"] == 0.35
    assert m["bn_recalibration_batches"] == 3 and m["from"] == str(trained_run)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["criterion"] == "l1" and cfg["from"] == str(trained_run) and cfg["dataset"] == "digits"
    report = json.loads((out / "prune_report.json").read_text())
    assert report["groups_pruned"] == len(report["groups"]) > 0 and report["macs_after"] == m["macs"]
    model = prunekit.load_model(out)  # rebuilt without pickle
    x = runs.example_inputs(model.prunekit_spec, 1)
    assert prunekit.count_macs(model, x) == m["macs"]
    assert "prune: done" in (out / "log.txt").read_text()
    assert f"wrote {out}" in capsys.readouterr().out


def test_prune_cli_target_macs_with_taylor(trained_run, tmp_path):
    out = tmp_path / "taylor"
    rc = main(["prune", "--from", str(trained_run), "--criterion", "taylor", "--target-macs", "0.6",
               "--calib-batches", "2", "--no-recalibrate-bn", "--out", str(out)])
    assert rc == 0
    m = runs.read_metrics(out)
    assert abs(m["macs_kept"] - 0.6) <= 0.006 and m["bn_recalibration_batches"] == 0


def test_prune_cli_reconstructs_blocks(trained_run, tmp_path):
    out = tmp_path / "rebuilt"
    rc = main(["prune", "--from", str(trained_run), "--criterion", "variance", "--compensate", "mean", "--ratio",
               "0.5", "--ignore", "features\\.10", "--calib-batches", "3", "--reconstruct-steps", "10",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "prune_report.json").read_text())
    recs = report["reconstruction"]
    pruned = [layer for g in report["groups"] for layer in g["layers"]]
    assert recs and all(any(layer.startswith(r["block"] + ".") for layer in pruned) for r in recs)
    assert all(r["kept"] in ("reconstructed", "compensated") and r["loss_after"] <= r["loss_before"] for r in recs)


@pytest.mark.parametrize("args,msg", [
    (["--ratio", "1.5"], "--ratio (ratio) = '1.5' is invalid"),
    (["--criterion", "l7"], "unknown criterion 'l7'"),
    (["--ratio", "0.3", "--target-macs", "0.5"], "can't provide both `ratio`"),
])
def test_prune_cli_bad_values_name_the_flag(trained_run, tmp_path, capsys, args, msg):
    rc = main(["prune", "--from", str(trained_run), "--out", str(tmp_path / "x"), *args])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_graph_cli_draws_groups(trained_run, tmp_path):
    dot = tmp_path / "g.dot"
    assert main(["graph", "--from", str(trained_run), "--out", str(dot)]) == 0
    text = dot.read_text()
    assert text.startswith("digraph") and "subgraph cluster_0" in text and "->" in text
    if shutil.which("dot"):
        svg = tmp_path / "g.svg"
        assert main(["graph", "--model", "resnet20", "--preset", "interior", "--out", str(svg)]) == 0
        assert "<svg" in svg.read_text()


def test_graph_cli_needs_exactly_one_source(tmp_path, capsys):
    assert main(["graph", "--out", str(tmp_path / "g.dot")]) == 2
    assert "exactly one of --model NAME or --from DIR" in capsys.readouterr().err
    torch.manual_seed(0)
