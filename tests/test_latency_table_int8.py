"""Latency tables of int8 kernels (``--latency-backend onnxruntime-int8``), the spread across repeats, and the int8
paired check: quantized one-op graphs that run in ONNX Runtime, their own cache key, width choice on a fake
VNNI-like step function, clear errors for an unknown backend and a missing onnxruntime."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.measure import latency_int8 as i8
from prunekit.measure.latency_table import LatencyTable, OpSpec
from prunekit.pruning.structured import latency as lat
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import PruneSettings

CONV = OpSpec("conv2d", 8, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1, (1, 12, 12), True)
DEPTHWISE = OpSpec("conv2d", 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 16, (1, 10, 10), True)
LINEAR = OpSpec("linear", 32, 10, in_shape=(2,))


def vnni_ms(spec: OpSpec) -> float:
    """A fake int8 backend: VNNI-like blocks of 4 input x 16 output channels (cost per block pair and position)."""
    pos = math.prod(spec.out_spatial())
    k = math.prod(spec.kernel) if spec.kernel else 1
    cin = 1 if spec.depthwise else math.ceil(spec.cin / spec.groups / 4)
    return 1e-3 * pos * k * cin * math.ceil(spec.cout / 16) + 0.01


def fp32_ms(spec: OpSpec) -> float:
    """A fake fp32 backend: blocks of 16 channels on both sides."""
    pos = math.prod(spec.out_spatial())
    k = math.prod(spec.kernel) if spec.kernel else 1
    cin = 1 if spec.depthwise else math.ceil(spec.cin / spec.groups / 16)
    return 1e-3 * pos * k * cin * math.ceil(spec.cout / 16) + 0.01


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 40, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10))


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("spec", [CONV, DEPTHWISE, LINEAR], ids=["conv", "depthwise", "linear"])
def test_int8_op_model_is_quantized_runs_in_ort_and_profiles_int8_kernels(spec):
    pytest.importorskip("onnxruntime")
    import onnx

    from prunekit.measure.latency_table import _input_of, onnx_op_model

    q = i8.int8_op_model(spec)
    ops = [n.op_type for n in onnx.load_from_string(q).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # QDQ, as prunekit quantize writes it
    x = _input_of(spec).numpy()
    y8, y32 = _run(q, x), _run(onnx_op_model(spec), x)
    assert y8.shape == y32.shape
    assert np.linalg.norm(y8 - y32) / np.linalg.norm(y32) < 0.05  # int8 is close to float: a real quantization
    nodes = i8.profile_nodes(q, {"x": x}, threads=1, runs=2)
    kernels = {op for _ms, op in nodes.values() if op not in i8.BOUNDARY_OPS}
    assert kernels and kernels <= {"QLinearConv", "QLinearMatMul", "QLinearAdd", "NhwcQLinearConv", "QGemm"}


def test_int8_settings_are_those_of_prunekit_quantize():
    from prunekit.quantize.config import QuantizeConfig

    cfg = QuantizeConfig()
    assert cfg.backend == "onnxruntime"
    for key in ("per_channel", "activation_type", "weight_type", "reduce_range", "calibrate_method"):
        assert i8.ORT_INT8[key] == getattr(cfg, key), key


def test_int8_table_is_timed_and_cached_under_its_own_key(tmp_path):
    pytest.importorskip("onnxruntime")
    specs = [CONV, CONV.with_channels(cout=16), LINEAR]
    t1 = LatencyTable("onnxruntime-int8", 1, cache_dir=tmp_path, runs=2, warmup=1)
    t1.measure(specs)
    assert t1.measured == 3 and all(t1[s] > 0 for s in specs) and t1.path.is_file()
    assert t1.env["int8"]["per_channel"] and t1.env["onnxruntime"]
    assert set(t1.spreads) == set(t1.entries) and all(lo <= hi for lo, hi in t1.spreads.values())
    t2 = LatencyTable("onnxruntime-int8", 1, cache_dir=tmp_path, runs=2, warmup=1)
    t2.measure(specs)
    assert t2.measured == 0 and t2.hits == 3 and t2.entries == t1.entries and t2.spreads == t1.spreads
    fp = LatencyTable("onnxruntime", 1, cache_dir=tmp_path)
    assert fp.path != t1.path and len(fp) == 0  # the float table of the same runtime is another table


def test_table_keeps_the_spread_across_repeats(tmp_path):
    calls = iter([2.0, 1.5, 3.0, 3.3] * 2)
    t = LatencyTable("eager", 1, cache_dir=tmp_path, timer=lambda s: next(calls), repeats=2)
    t.measure([CONV, LINEAR])
    assert t[CONV] == 1.5 and t.spreads[CONV.key()] == (1.5, 2.0)  # the entry is the lowest repeat
    assert t[LINEAR] == 3.0 and t.spreads[LINEAR.key()] == (3.0, 3.3)
    s = t.spread()
    assert s["entries"] == 2 and s["max"] == pytest.approx(0.5 / 1.5)
    again = LatencyTable("eager", 1, cache_dir=tmp_path, timer=lambda s: 0.0)
    assert again.spreads == t.spreads  # read back from the cache file


def _model(tmp_path, backend, timer, round_to=None):
    model = tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = PruningGraph(model, x)
    units = plan_units(graph, PruneSettings.build({}))
    table = LatencyTable(backend, 2, cache_dir=tmp_path / backend, timer=timer)
    return lat.LatencyModel(graph, units, x, table, max_ratio=0.9, round_to=round_to)


def test_width_choice_lands_at_a_step_top_for_int8_as_for_float(tmp_path):
    int8 = _model(tmp_path, "onnxruntime-int8", vnni_ms)  # default grid of an int8 table: every 4 channels
    fp32 = _model(tmp_path, "eager", fp32_ms, round_to=4)
    name = "6"  # conv 64 -> 40 (1x1), its consumer the linear head: output steps at 16 / 32 / 40
    assert int8.grids[name] == list(range(4, 41, 4)) == fp32.grids[name]
    for lm in (int8, fp32):
        assert lm.choose_width(name, 20) == 32  # 17..32 is one step: keep its top
        assert lm.choose_width(name, 30) == 32
        assert lm.choose_width(name, 33) == 32  # one channel past an edge would pay a whole step
        assert lm.choose_width(name, 17) == 16
        assert lm.choose_width(name, 36) == 40
    # an int8 input block is 4 channels, a float one 16: the group feeding a 3x3 conv pays every 4 channels in int8
    curve8, curve32 = dict(int8.steps("0")), dict(fp32.steps("0"))
    assert curve8[20] < curve8[24] < curve8[28] and curve32[20] == curve32[28]


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ConfigError, match="'tensorrt-int8'.*eager, onnxruntime, onnxruntime-int8, openvino-int8"):
        LatencyTable("tensorrt-int8", 2, cache=False)
    with pytest.raises(ConfigError, match="latency_backend.*'onnxruntime-int8'"):
        PruneSettings.build({"latency_backend": "int8"}, source="prune()")
    assert PruneSettings.build({"latency_backend": "onnxruntime-int8"}).latency.backend == "onnxruntime-int8"


def test_missing_onnxruntime_is_one_error_naming_the_pip_install(monkeypatch):
    for name in ("onnxruntime", "onnxruntime.quantization"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=r"--latency-backend onnxruntime-int8.*pip install 'prunekit\[quantize\]'"):
        LatencyTable("onnxruntime-int8", 2, cache=False)
    with pytest.raises(ConfigError, match="pip install"):
        i8.export_int8(tiny(), torch.randn(1, 3, 8, 8), "unused.onnx")


def test_prune_with_the_int8_table_checks_the_quantized_models(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from prunekit.pruning.structured import latency_context, prune_with_settings

    monkeypatch.setattr(lat, "LatencyTable", lambda b, t: LatencyTable(b, t, cache_dir=tmp_path, timer=vnni_ms))
    monkeypatch.setattr(latency_context, "CONTEXT_TOL", 0.2)  # a tiny model: one grid step moves its MACs a lot
    monkeypatch.setattr(latency_context, "model_timer", lambda x, backend, threads, runs: (
        lambda models: {k: _conv_ms(m, x) for k, m in models.items()}))
    model, x = tiny().eval(), torch.randn(1, 3, 8, 8)
    s = PruneSettings.build({"criterion": "l2", "target_macs": 0.5, "latency_backend": "onnxruntime-int8",
                             "latency_threads": 1, "latency_verify_runs": 4, "latency_context_groups": 1})
    rep = prune_with_settings(model, x, s)
    la = rep.latency
    assert len(la["context"]) == 1 and la["context"][0]["chosen"] in la["context"][0]["timed"]
    assert "skipped" not in la["context"][0]
    assert la["backend"] == "onnxruntime-int8" and la["int8"]["activation_type"] == "uint8"
    assert la["rest_ms"] > 0  # the quantized model's non-kernel nodes (quantize, pooling) were profiled
    assert la["measured_kept"] > 0 and la["dense_ms"] > 0
    lo, hi = la["measured_kept_range"]
    assert 0 < lo <= hi and f"rounds {lo:.1%}-{hi:.1%})" in rep.summary()  # the spread over rounds is reported
    assert all(c % 4 == 0 for m in model if isinstance(m, nn.Conv2d) for c in [m.out_channels])


def test_int8_rest_leaves_out_the_int8_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    path = i8.export_int8(model, x, tmp_path / "int8.onnx")
    import onnxruntime as ort

    (y8,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(y8 - model(x).numpy()).max() < 0.05 * np.abs(model(x).numpy()).max() + 1e-3
    nodes = i8.profile_nodes(str(path), {"input": x.numpy()}, threads=1, runs=2)
    assert sum(op in i8.INT8_TIMED_OPS for _ms, op in nodes.values()) >= 2  # the convs run as int8 kernels
    rest = i8.rest_latency_ms(model, x, "onnxruntime-int8", threads=1, runs=2)
    assert 0 < rest < sum(ms for ms, _op in nodes.values()) * 5  # at least the input's QuantizeLinear
    with pytest.raises(ConfigError, match="valid"):
        i8.rest_latency_ms(model, x, "tensorrt", threads=1, runs=2)


def _conv_ms(model: nn.Module, x: torch.Tensor) -> float:
    """The fake int8 backend summed over the model's layers (what a whole-model timing would give)."""
    from prunekit.measure.latency_table import collect_op_specs

    return sum(vnni_ms(s) for s in collect_op_specs(model, x).values())


def test_in_context_check_moves_a_width_that_is_slow_inside_the_network(tmp_path):
    from prunekit.pruning.structured.latency_context import refine_in_context
    from prunekit.pruning.structured.search import count_macs_meta, macs_kept
    from prunekit.pruning.structured.selection import select

    model, x = tiny().eval(), torch.randn(1, 3, 8, 8)
    graph = PruningGraph(model, x)
    units = plan_units(graph, PruneSettings.build({}))
    lm = lat.LatencyModel(graph, units, x, LatencyTable("onnxruntime-int8", 2, cache_dir=tmp_path, timer=vnni_ms),
                          max_ratio=0.9)
    scores = {u.name: torch.arange(u.size, dtype=torch.float).flip(0) for u in units}
    sel = lat.latency_widths(units, scores, select(units, scores, 0.45, "local", {}, 0.9, None), lm, 0.9)
    table_widths = lat.kept_channels(units, sel)
    before = count_macs_meta(graph, x)

    def macs_of(s):
        return macs_kept(graph, x, units, s, before)

    slow = table_widths["3"]  # in context, this width of conv "3" pays double (a layout change the table misses)
    timed = []

    def time_models(models):
        timed.append(sorted(models))
        return {k: _conv_ms(m, x) * (2.0 if m[3].out_channels == slow and k != "dense" else 1.0)
                for k, m in models.items()}

    out, trials = refine_in_context(graph, units, scores, sel, lm, 2, 0.9, macs_of, time_models, tol=0.2)
    assert [t["group"] for t in trials] == ["0", "3"]  # the two costliest groups (conv "3" counts for both)
    t3 = trials[1]
    assert t3["table"] == slow and t3["chosen"] != slow and set(t3["timed"]) > {slow}
    assert lat.kept_channels(units, out)["3"] == t3["chosen"]
    assert all(abs(v[1] - macs_of(sel)) <= 0.2 for t in trials for v in t["timed"].values())
    assert all("dense" in names for names in timed)  # every timing is paired with the dense model
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [48, 64, 40]  # the model is untouched
    same, trials2 = refine_in_context(graph, units, scores, sel, lm, 2, 0.9, macs_of,
                                      lambda ms: {k: _conv_ms(m, x) for k, m in ms.items()}, tol=0.2)
    for t in trials2:  # no surprise in context: each group keeps the width with the best latency cut per MACs cut
        assert t["timed"][t["chosen"]][2] == max(v[2] for v in t["timed"].values())
    kept, skipped = refine_in_context(graph, units, scores, sel, lm, 2, 0.9, macs_of, time_models, tol=0.0)
    assert kept.removed == sel.removed and all("skipped" in t for t in skipped)  # nothing within tol: nothing timed


def test_prune_cli_with_the_int8_latency_backend(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import json

    from prunekit.cli.main import main

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    rc = main(["prune", "--from", str(trained_run), "--criterion", "l1", "--target-macs", "0.6", "--latency-backend",
               "onnxruntime-int8", "--latency-threads", "1", "--latency-verify-runs", "3", "--calib-batches", "2",
               "--out", str(out)])
    assert rc == 0
    la = json.loads((out / "metrics.json").read_text())["latency"]
    assert la["backend"] == "onnxruntime-int8" and la["table_entries_timed"] > 0 and la["measured_kept"] > 0
    assert la["table_spread"]["entries"] == la["table_entries_timed"]
    (table,) = (tmp_path / "cache" / "latency").glob("onnxruntime-int8-t1-*.json")
    assert json.loads(table.read_text())["env"]["int8"]["per_channel"] is True


# ----------------------------------------------------------------------------------------------- openvino-int8
def test_openvino_int8_layer_runs_the_int8_kernel_nncf_gives_it():
    pytest.importorskip("openvino")
    nncf = pytest.importorskip("nncf")
    import openvino as ov

    from prunekit.measure import latency_ov
    from prunekit.measure.latency_table import _input_of, onnx_op_model

    x = np.abs(_input_of(CONV).numpy())
    ours = latency_ov.profile_ov(latency_ov.ov_op_model(CONV), [x], threads=1, runs=2)
    (kernel,) = [(kind, impl) for _ms, kind, impl in ours.values() if kind not in latency_ov.BOUNDARY_OPS]
    assert kernel[0] == "Convolution" and "I8" in kernel[1].upper()  # an int8 kernel, not a float one
    fmodel = ov.Core().read_model(onnx_op_model(CONV), b"")
    q = nncf.quantize(fmodel, nncf.Dataset([{0: x}] * 2), preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=2)
    theirs = latency_ov.profile_ov(q, [x], threads=1, runs=2)
    assert kernel in {(kind, impl) for _ms, kind, impl in theirs.values()}  # the very kernel NNCF's model runs


def test_openvino_int8_table_is_timed_and_cached_under_its_own_key(tmp_path):
    pytest.importorskip("openvino")
    specs = [CONV, CONV.with_channels(cout=16), DEPTHWISE, LINEAR]
    t1 = LatencyTable("openvino-int8", 1, cache_dir=tmp_path, runs=2, warmup=1)
    t1.measure(specs)
    assert t1.measured == 4 and all(t1[s] > 0 for s in specs) and t1.env["openvino"]
    t2 = LatencyTable("openvino-int8", 1, cache_dir=tmp_path)
    assert t2.entries == t1.entries
    assert t1.path != LatencyTable("onnxruntime-int8", 1, cache_dir=tmp_path).path


def test_missing_openvino_is_one_error_naming_the_pip_install(monkeypatch):
    from prunekit.measure import latency_ov

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"--latency-backend openvino-int8.*pip install 'prunekit\[quantize\]'"):
        LatencyTable("openvino-int8", 2, cache=False)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ConfigError, match="openvino and nncf.*pip install"):
        latency_ov.nncf_int8(tiny(), torch.randn(1, 3, 8, 8))


def test_prune_with_the_openvino_int8_table_checks_nncf_models(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from prunekit.pruning.structured import prune_with_settings

    monkeypatch.setattr(lat, "LatencyTable", lambda b, t: LatencyTable(b, t, cache_dir=tmp_path, timer=vnni_ms))
    model, x = tiny().eval(), torch.randn(1, 3, 8, 8)
    s = PruneSettings.build({"criterion": "l2", "target_macs": 0.5, "latency_backend": "openvino-int8",
                             "latency_threads": 1, "latency_verify_runs": 4})
    la = prune_with_settings(model, x, s).latency
    assert la["backend"] == "openvino-int8" and la["rest_ms"] > 0 and la["measured_kept"] > 0
    assert la["int8"]["graph"].startswith("FakeQuantize")


def test_failed_preprocessing_is_said_and_the_graph_still_quantized(monkeypatch, caplog):
    """ONNX Runtime's pre-processing failing on a graph is a warning (after the quantizer's logging is restored),
    not a silent skip; the graph is quantized as it is."""
    import logging

    from onnxruntime import quantization

    from prunekit.measure.latency_int8 import quantize_onnx
    from prunekit.measure.latency_table import _input_of, onnx_op_model

    def broken(*_a, **_k):
        raise RuntimeError("shape inference failed")

    monkeypatch.setattr(quantization, "quant_pre_process", broken)
    feeds = [{"x": torch.randn(tuple(_input_of(CONV).shape)).numpy()} for _ in range(2)]
    with caplog.at_level(logging.INFO):
        q = quantize_onnx(onnx_op_model(CONV), feeds, preprocess=True)
    assert q and any(r.levelno == logging.WARNING and "shape inference failed" in r.getMessage()
                     for r in caplog.records)
