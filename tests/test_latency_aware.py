"""Latency-aware structured pruning: latency tables, width choice at latency steps, target_latency, eager folding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.measure.latency_table import (
    LatencyTable,
    OpSpec,
    collect_op_specs,
    fold_batchnorm,
    inference_copy,
    onnx_op_model,
)
from prunekit.pruning.structured import latency as lat
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.selection import select
from prunekit.pruning.structured.settings import PruneSettings

BLOCK = 16  # the fake backend's kernels work in blocks of 16 channels


def fake_ms(spec: OpSpec) -> float:
    """A deterministic step-function backend: cost ~ blocks of input x blocks of output channels x positions."""
    pos = math.prod(spec.out_spatial())
    k = math.prod(spec.kernel) if spec.kernel else 1
    cin = 1 if spec.depthwise else math.ceil(spec.cin / spec.groups / BLOCK)
    return 1e-3 * pos * k * cin * math.ceil(spec.cout / BLOCK) + 0.01


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 40, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10))


def fake_model(tmp_path, model=None):
    model = (model or tiny()).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = PruningGraph(model, x)
    units = plan_units(graph, PruneSettings.build({}))
    table = LatencyTable("eager", 2, cache_dir=tmp_path, timer=fake_ms)
    return model, x, graph, units, lat.LatencyModel(graph, units, x, table, max_ratio=0.9, round_to=4)


def test_channel_grid():
    assert lat.channel_grid(48, 5) == list(range(4, 49, 4))
    g = lat.channel_grid(1000, 100)
    assert g[0] == 96 and g[-1] == 1000 and all(c % 16 == 0 for c in g[:-1])
    assert lat.channel_grid(48, 5, round_to=16) == [16, 32, 48]
    assert lat.channel_grid(30, 3, multiple=3) == list(range(12, 31, 12)) + [30]


def test_width_choice_sits_at_the_top_of_latency_steps(tmp_path):
    *_, lm = fake_model(tmp_path)
    name = "0"  # the first conv: 48 channels, steps at 16 / 32 / 48
    assert lm.grids[name] == list(range(4, 49, 4))
    assert lm.choose_width(name, 30) == 32  # 29..32 cost the same as 28: keep the whole step
    assert lm.choose_width(name, 33) == 32  # one channel past an edge would pay a whole step: drop it
    assert lm.choose_width(name, 20) == 32  # 17..32: one step
    assert lm.choose_width(name, 17) == 16  # the grid count below (16) ends a step: 17 would start the next
    assert lm.choose_width(name, 16) == 16
    assert lm.choose_width(name, 40) == 48  # the last step is free up to the full width
    assert lm.choose_width(name, 34, min_keep=34) == 48  # no grid count allowed at or below: up to the next step top
    assert lm.choose_width(name, 2) == 16  # below the grid: from its first count (4) to the top of its step
    curve = dict(lm.steps(name))
    assert curve[20] == curve[32] < curve[36] == curve[48]


def test_latency_widths_keep_the_criterion_ranking(tmp_path):
    _, _, _, units, lm = fake_model(tmp_path)
    scores = {u.name: torch.arange(u.size, dtype=torch.float).flip(0) for u in units}  # high index = low score
    sel = select(units, scores, 0.35, "local", {}, 0.9, None)
    out = lat.latency_widths(units, scores, sel, lm, 0.9)
    for u in units:
        kept = u.size - len(out.removed.get(u.name, []))
        assert kept == lm.choose_width(u.name, u.size - len(sel.removed.get(u.name, [])), 1)
        assert out.removed.get(u.name, []) == list(range(kept, u.size))  # the lowest-scored ones, in order


def test_prediction_is_the_sum_of_the_table(tmp_path):
    model, x, _, units, lm = fake_model(tmp_path)
    specs = collect_op_specs(model, x)
    assert lm.predict({}) == pytest.approx(sum(fake_ms(s) for s in specs.values()))
    one = sum(fake_ms(s) for n, s in specs.items() if n not in ("0", "3"))  # one group changed: exact
    one += fake_ms(specs["0"].with_channels(cout=24)) + fake_ms(specs["3"].with_channels(cin=24))
    assert lm.predict({"0": 24}) == pytest.approx(one, rel=1e-9)
    half = {u.name: u.channels // 2 for u in units}  # both sides of a layer changed: the product of its two curves
    want = sum(fake_ms(s) for n, s in specs.items() if n not in ("0", "3", "6", "10"))
    want += fake_ms(specs["0"].with_channels(cout=24)) + fake_ms(specs["3"].with_channels(cin=24, cout=32))
    want += fake_ms(specs["6"].with_channels(cin=32, cout=20)) + fake_ms(specs["10"].with_channels(cin=20))
    assert lm.predict(half) == pytest.approx(want, rel=0.01)


def test_search_latency_meets_the_target_with_the_least_pruning(tmp_path):
    _, _, _, units, lm = fake_model(tmp_path)
    torch.manual_seed(1)
    scores = {u.name: torch.rand(u.size) for u in units}
    for target in (0.7, 0.5, 0.3):
        ratio, sel, kept, probes = lat.search_latency(units, scores, "global", {}, 0.9, lm, target)
        predicted = lm.predict(lat.kept_channels(units, sel)) / lm.dense_ms
        assert predicted == pytest.approx(kept) and predicted <= target
        pooled = sum(u.size for u in units)
        fewer = lat.latency_select(units, scores, ratio - 1 / pooled, "global", {}, 0.9, lm)
        assert lm.predict(lat.kept_channels(units, fewer)) / lm.dense_ms > target  # one channel less: misses it
    with pytest.raises(PruningError, match="out of reach"):
        lat.search_latency(units, scores, "global", {}, 0.9, lm, 0.01)


def test_prune_target_latency_end_to_end_with_a_fake_table(tmp_path, monkeypatch):
    from prunekit.measure.macs import call_model
    from prunekit.pruning.structured import prune_with_settings

    monkeypatch.setattr(lat, "LatencyTable", lambda b, t: LatencyTable(b, t, cache_dir=tmp_path, timer=fake_ms))
    monkeypatch.setattr(lat, "rest_latency_ms", lambda *a, **k: 0.0)
    model, x = tiny().eval(), torch.randn(1, 3, 8, 8)
    s = PruneSettings.build({"criterion": "l2", "target_latency": 0.5, "latency_verify_runs": 0})
    rep = prune_with_settings(model, x, s)
    assert rep.latency["backend"] == "eager" and rep.latency["predicted_kept"] <= 0.5
    assert "measured_kept" not in rep.latency
    assert call_model(model, x).shape == (1, 10)
    assert {m.out_channels for m in model if isinstance(m, nn.Conv2d)} <= {4 * i for i in range(1, 17)}
    assert "latency (eager, 2 threads): predicted" in rep.summary()


def test_real_table_build_is_cached(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    specs = list(collect_op_specs(model, torch.randn(1, 3, 10, 10)).values())
    assert specs[0] == OpSpec("conv2d", 3, 16, (3, 3), (1, 1), (0, 0), (1, 1), 1, (1, 10, 10), True)
    todo = specs + [s.with_channels(cout=c) for s in specs for c in (4, 12)]
    t1 = LatencyTable("eager", 1, cache_dir=tmp_path, runs=2, warmup=1)
    t1.measure(todo)
    assert t1.measured == 6 and t1.path.is_file() and all(t1[s] > 0 for s in todo)
    t2 = LatencyTable("eager", 1, cache_dir=tmp_path, runs=2, warmup=1)
    t2.measure(todo)
    assert t2.measured == 0 and t2.hits == 6 and t2.entries == t1.entries
    t3 = LatencyTable("eager", 2, cache_dir=tmp_path)  # another thread count: another table
    assert len(t3) == 0 and t3.path != t1.path


def test_onnx_one_op_model_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    spec = OpSpec("conv2d", 4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, (1, 9, 9), True)
    sess = ort.InferenceSession(onnx_op_model(spec), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": torch.randn(1, 4, 9, 9).numpy()})
    assert y.shape == (1, 6, 5, 5) == (spec.in_shape[0], spec.cout, *spec.out_spatial()[1:])
    lin = OpSpec("linear", 5, 7, in_shape=(2, 3))
    (y,) = ort.InferenceSession(onnx_op_model(lin), providers=["CPUExecutionProvider"]).run(
        None, {"x": torch.randn(2, 3, 5).numpy()})
    assert y.shape == (2, 3, 7)


def test_fold_batchnorm_is_exact_and_leaves_the_model_alone():
    model = tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    fast, what = inference_copy(model)
    assert "2 BatchNorm folded" in what and "channels_last" in what
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    torch.testing.assert_close(fast(x.to(memory_format=torch.channels_last)), model(x), atol=1e-5, rtol=1e-4)
    train = tiny().train()
    assert fold_batchnorm(train) == 0  # training-mode BN is not folded (its statistics are the batch's)


@pytest.mark.parametrize("values, match", [
    ({"target_latency": 0.5, "ratio": 0.3}, "target_latency.*ratio"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "target_latency.*target_macs"),
    ({"target_latency": 1.5}, "target_latency"),
    ({"target_latency": 0.5, "scope": "adaptive"}, "adaptive"),
    ({"latency_backend": "tensorrt"}, "latency_backend"),
    ({"latency_threads": 0}, "latency_threads"),
])
def test_bad_settings(values, match):
    with pytest.raises(ConfigError, match=match):
        PruneSettings.build(values, source="prune()")


def test_target_latency_defaults_to_eager_and_bad_table_backend():
    assert PruneSettings.build({"target_latency": 0.6}).latency.backend == "eager"
    assert PruneSettings.build({"target_latency": 0.6, "latency_backend": "onnxruntime"}).latency.backend \
        == "onnxruntime"
    with pytest.raises(ConfigError, match="latency-backend 'cuda'.*eager, onnxruntime"):
        LatencyTable("cuda", 2)


def test_prune_cli_latency_backend_writes_predicted_and_measured(trained_run, tmp_path, monkeypatch):
    import json

    from prunekit.cli.main import main

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    rc = main(["prune", "--from", str(trained_run), "--criterion", "l1", "--target-macs", "0.6", "--latency-backend",
               "eager", "--latency-threads", "1", "--latency-verify-runs", "3", "--calib-batches", "2",
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    la = m["latency"]
    assert la["backend"] == "eager" and la["table_entries_timed"] > 0 and 0 < la["predicted_kept"] <= 1
    assert la["measured_kept"] > 0 and la["dense_ms"] > 0
    assert list((tmp_path / "cache" / "latency").glob("eager-t1-*.json"))


@pytest.mark.parametrize("args, msg", [
    (["--target-latency", "0.5", "--ratio", "0.3"], "target_latency"),
    (["--target-latency", "2"], "target-latency"),
    (["--latency-backend", "cuda"], "latency-backend"),
])
def test_prune_cli_bad_latency_flags(trained_run, tmp_path, capsys, args, msg):
    from prunekit.cli.main import main

    try:
        rc = main(["prune", "--from", str(trained_run), "--out", str(tmp_path / "x"), *args])
    except SystemExit as e:  # argparse rejects a value outside the choices itself
        rc = e.code
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_monotone_fit_averages_a_low_outlier():
    fit = lat._monotone({8: 1.0, 16: 1.0, 24: 2.0, 32: 1.2, 40: 3.0})
    assert list(fit.values()) == sorted(fit.values())
    assert fit[8] == fit[16] == 1.0 and fit[24] == fit[32] == pytest.approx(1.6) and fit[40] == 3.0


def test_onnx_node_times_gives_each_node_of_the_whole_model_and_rest_is_its_non_conv_part():
    pytest.importorskip("onnxruntime")
    from prunekit.measure.latency_table import TIMED_ONNX_OPS, onnx_node_times, rest_latency_ms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    nodes = onnx_node_times(model, x, threads=1, runs=3)
    convs = [n for n, (_ms, op) in nodes.items() if op in TIMED_ONNX_OPS]
    assert len(convs) == 3  # two convs (ReLU fused into the first) and the linear layer
    assert all(ms >= 0 for ms, _ in nodes.values())
    assert any(op not in TIMED_ONNX_OPS for _ms, op in nodes.values())  # the pooling at least
    assert rest_latency_ms(model, x, "onnxruntime", threads=1, runs=3) >= 0
