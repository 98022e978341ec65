"""Profile: baseline vs pruned figures and reductions, profile.json keys (macs_reduction, latency_reduction and
latency_efficiency per backend), per-layer table that adds up, verdicts, and clear errors for bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

import prunekit
from prunekit import runs
from prunekit.cli.main import main
from prunekit.errors import ConfigError
from prunekit.measure import count_macs, count_params
from prunekit.measure.layers import compare_layers, layer_times
from prunekit.measure.profile import PROFILE_FILE, profile_models, verdict

FAST = ["--runs", "6", "--warmup", "1", "--rounds", "2", "--layer-runs", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _fresh_console_logging():
    """Drop the CLI's console handler after each test (it is bound to the first test's captured stdout)."""
    yield
    logger = logging.getLogger("prunekit")
    for h in [h for h in logger.handlers if getattr(h, "_prunekit_console", False)]:
        logger.removeHandler(h)


def make_run(d: Path, model: nn.Module) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    runs.save_model(d, model)
    runs.write_config(d, {"dataset": "digits"})
    runs.write_metrics(d, {"top1": 0.0})
    (d / runs.LOG).write_text("")
    return d


def smallcnn() -> nn.Module:
    m = prunekit.create_model("smallcnn", in_channels=1, num_classes=10).eval()
    m.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 16, 16]}
    return m


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    base = smallcnn()
    pruned = smallcnn()
    pruned.load_state_dict(base.state_dict())
    x = runs.example_inputs(pruned.prunekit_spec, 1)
    tp.pruner.MetaPruner(pruned, x, tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                         ignored_layers=[pruned.classifier]).step()
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "base", base), make_run(root / "pruned", pruned), base, pruned


def test_profile_models_figures_and_keys(pair):
    _, _, base, pruned = pair
    x = runs.example_inputs(pruned.prunekit_spec, 2)
    p = profile_models(base, pruned, x, backends=("eager",), runs=6, warmup=1, rounds=3, threads=1, layer_runs=2,
                       top=5)
    assert p["batch_size"] == 2 and p["threads"] == 1 and p["rounds"] == 3
    assert p["baseline"]["macs"] == count_macs(base, x) and p["pruned"]["params"] == count_params(pruned)
    assert p["macs_reduction"] == pytest.approx(1 - count_macs(pruned, x) / count_macs(base, x))
    assert p["flops_reduction"] == pytest.approx(p["macs_reduction"]) and 0.5 < p["macs_reduction"] < 0.9
    e = p["backends"]["eager"]
    assert e["baseline"]["runs"] == e["pruned"]["runs"] == 6 and len(e["baseline"]["round_medians_ms"]) == 3
    assert p["latency_reduction"]["eager"] == pytest.approx(1 - e["pruned"]["median_ms"] / e["baseline"]["median_ms"])
    assert p["latency_efficiency"]["eager"] == pytest.approx(p["latency_reduction"]["eager"] / p["macs_reduction"])
    assert e["speedup"] == pytest.approx(e["baseline"]["median_ms"] / e["pruned"]["median_ms"])
    assert e["verdict"].startswith("eager: ")
    rows = p["layers"]["rows"]
    assert len(rows) == 6 and rows[-1]["name"].startswith("(other ")  # top 5 + the rest
    assert sum(r["baseline_ms"] for r in rows) == pytest.approx(p["layers"]["baseline_total_ms"], rel=1e-9)
    assert sum(r["pruned_macs"] for r in rows) == count_macs(pruned, x, per_sample=False)


def test_layer_times_add_up_and_skip_containers():
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 8, 8)
    t = layer_times(model, x, runs=2, warmup=1, threads=1)
    rows = {r["name"]: r for r in t["layers"]}
    assert sum(r["ms"] for r in t["layers"]) == pytest.approx(t["total_ms"], rel=1e-9)
    assert sum(r["share"] for r in t["layers"]) == pytest.approx(1.0)
    assert sum(r["macs"] for r in t["layers"]) == count_macs(model, x, per_sample=False)
    assert not any(isinstance(model.get_submodule(n), nn.Sequential) for n in rows if n != "<root>")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(convs) <= set(rows) and all(rows[n]["macs"] > 0 and rows[n]["calls"] == 1 for n in convs)
    # a residual block's own work (the add/relu outside its children) is attributed to the block, with no MACs
    blocks = [r for r in t["layers"] if r["type"] == "BasicBlock"]
    assert blocks and all(r["macs"] == 0 for r in blocks) and any(r["ms"] > 0 for r in blocks)
    assert t["forward_ms"] >= t["total_ms"] * 0.5
    joined = compare_layers(t, t, top=3)
    assert [r["time_reduction"] for r in joined[:3]] == [0.0, 0.0, 0.0] and joined[3]["name"] == \
        f"(other {len(t['layers']) - 3} modules)"


@pytest.mark.parametrize("macs, lat, phrase", [
    (0.5, 0.48, "latency follows MACs; the MACs cut is real speed"),
    (0.5, 0.35, "latency follows MACs only in part"),
    (0.5, 0.10, "MACs overstate the gain"),
    (0.5, -0.05, "no speed-up"),
    (0.0, 0.01, "about as many MACs"),
])
def test_verdict_bands(macs, lat, phrase):
    text = verdict(macs, lat, "onnxruntime", 1)
    assert text.startswith("onnxruntime: ") and phrase in text
    assert "Rounds disagree" in verdict(macs, lat, "onnxruntime", 1, spread=(0.1, 0.6))
    assert "Rounds disagree" not in verdict(macs, lat, "onnxruntime", 1, spread=(0.4, 0.5))


def test_cli_profile_writes_profile_json(pair, capsys):
    base_dir, pruned_dir, _, _ = pair
    argv = ["profile", "--baseline", str(base_dir), "--pruned", str(pruned_dir), "--backend", "eager,onnxruntime"]
    assert main([*argv, *FAST]) == 0
    out = capsys.readouterr().out
    assert "efficiency" in out and "per layer" in out and "onnxruntime: " in out and f"wrote {pruned_dir}" in out
    p = json.loads((pruned_dir / PROFILE_FILE).read_text())
    assert {"macs_reduction", "params_reduction", "flops_reduction", "latency_reduction", "latency_efficiency",
            "backends", "layers", "baseline", "pruned"} <= set(p)
    assert set(p["latency_reduction"]) == set(p["latency_efficiency"]) == {"eager", "onnxruntime"}
    for name in ("eager", "onnxruntime"):
        b = p["backends"][name]
        assert {"median_ms", "p90_ms", "p99_ms", "std_ms", "throughput", "times_ms"} <= set(b["baseline"])
        assert b["pruned"]["batch_size"] == 1 and b["pruned"]["threads"] == 1 and "verdict" in b
    assert p["config"]["backend"] == ["eager", "onnxruntime"] and p["pruned_dir"] == str(pruned_dir)


def test_cli_profile_out_and_batch(pair, tmp_path):
    base_dir, pruned_dir, _, _ = pair
    out = tmp_path / "p.json"
    assert main(["profile", "--baseline", str(base_dir), "--pruned", str(pruned_dir), "--backend", "eager",
                 "--batch-size", "4", "--no-layers", "--out", str(out), *FAST]) == 0
    p = json.loads(out.read_text())
    assert p["batch_size"] == 4 and "layers" not in p
    assert p["backends"]["eager"]["baseline"]["throughput"] == pytest.approx(
        4 / (p["backends"]["eager"]["baseline"]["median_ms"] / 1e3))


def test_failing_backend_is_recorded_not_fatal(pair, monkeypatch):
    _, _, base, pruned = pair

    def broken(m, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    x = runs.example_inputs(pruned.prunekit_spec, 1)
    p = profile_models(base, pruned, x, backends=("eager", "compile"), runs=2, warmup=0, rounds=1, layers=False)
    assert "inductor exploded" in p["backends"]["compile"]["error"]
    assert set(p["latency_reduction"]) == {"eager"}


def _err(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    return err


def test_cli_profile_errors(pair, tmp_path, capsys):
    base_dir, pruned_dir, _, _ = pair
    err = _err(["profile", "--baseline", str(base_dir), "--pruned", str(tmp_path / "nope")], capsys)
    assert "--pruned" in err and "does not exist" in err
    err = _err(["profile", "--baseline", str(base_dir), "--pruned", str(pruned_dir), "--backend", "eager,trt"], capsys)
    assert "unknown backend 'trt'" in err and "onnxruntime" in err
    if not torch.cuda.is_available():
        err = _err(["profile", "--baseline", str(base_dir), "--pruned", str(pruned_dir), "--backend", "cuda"], capsys)
        assert "--backend cuda: CUDA is not available" in err
    other = smallcnn()
    other.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 24, 24]}
    make_run(tmp_path / "other", other)
    err = _err(["profile", "--baseline", str(base_dir), "--pruned", str(tmp_path / "other")], capsys)
    assert "take different inputs" in err


def test_profile_models_rejects_unknown_backend(pair):
    _, _, base, pruned = pair
    with pytest.raises(ConfigError, match="unknown backend 'ort'"):
        profile_models(base, pruned, torch.randn(1, 1, 16, 16), backends=("ort",))
