"""Static int8 for CPU runtimes (prunekit.quantize): ONNX Runtime and OpenVINO run the int8 model close to float,
accuracy is read from the files on a loader, layers left in float stay float, the sensitivity ranking finds the layer
int8 hurts, and mistakes (a missing runtime, a corrupt / already quantized / all-float model) are one clean error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, ExportError, RunDirError
from prunekit.quantize import QuantizeConfig, accuracy, load_runner
from prunekit.quantize.graph import int8_nodes, layers, load_onnx
from prunekit.quantize.sensitivity import layer_sensitivity, trials

pytest.importorskip("onnxruntime")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def labelled(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eval batches labelled with the float model's own answers (float top-1 = 100%), and one known miss."""
    with torch.no_grad():
        data = [(x, model(x).argmax(1)) for x in batches(4, seed=1)]
    data[0][1][0] = (data[0][1][0] + 1) % 5
    return data


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_model_runs_close_to_float_and_is_evaluated(tmp_path, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    model = tiny()
    x = torch.randn(1, 3, 12, 12)
    report = prunekit.quantize(model, x, backend=backend, calib_data=batches(4, seed=0), out=tmp_path,
                               eval_data=labelled(model), threads=1)
    int8 = load_runner(report.int8_path, threads=1)
    for xb in batches(2, seed=3):
        ref = model(xb).detach().numpy()
        got = int8({int8.input_names[0]: xb.numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max(), rtol=0)  # int8: a few % of the range
        assert not np.allclose(got, ref, atol=1e-6)  # ...and really quantized
    assert report.rel_error < 1e-2
    assert report.accuracy_float["samples"] == 32
    assert report.accuracy_float["top1"] == pytest.approx(100 * 31 / 32)  # the float file answers as torch does
    assert report.accuracy_int8["top1"] >= 100 * 28 / 32
    saved = json.loads((tmp_path / "quantize.json").read_text())
    assert saved["int8_path"] == report.int8_path and saved["config"]["backend"] == backend
    if backend == "onnxruntime":
        assert int8_nodes(load_onnx(report.int8_path)) > 0 and int8_nodes(load_onnx(report.float_path)) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model_int8.onnx", "quantize.json"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.onnx", "model.xml",
                                                               "model_int8.bin", "model_int8.xml", "quantize.json"]


def test_accuracy_counts_hits_of_a_runner():
    class Fixed:
        input_names = ["input"]

        def __call__(self, feeds):
            b = feeds["input"].shape[0]
            logits = np.zeros((b, 3), dtype=np.float32)
            logits[:, 1] = 1.0  # always class 1
            return [logits]

    data = [(torch.zeros(4, 2), torch.tensor([1, 1, 0, 2])), (torch.zeros(2, 2), torch.tensor([1, 0]))]
    assert accuracy(Fixed(), data) == {"top1": 50.0, "top5": 100.0, "samples": 6}
    assert accuracy(Fixed(), data, max_batches=1)["top1"] == 50.0
    with pytest.raises(ConfigError, match="labelled"):
        accuracy(Fixed(), [torch.zeros(2, 2)])


def test_keep_float_leaves_the_layer_float(tmp_path):
    report = prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_data=batches(2, seed=0), out=tmp_path,
                               keep_float=["7"], threads=1)
    graph = load_onnx(report.int8_path)
    gemm = next(n for n in graph.graph.node if n.op_type == "Gemm")
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in gemm.input)  # a float Gemm
    conv = next(n for n in graph.graph.node if n.op_type == "Conv")
    assert any(producers.get(i) == "DequantizeLinear" for i in conv.input)  # the convolutions are int8
    assert report.kept_float == ["7"]


def test_sensitivity_finds_the_layer_int8_hurts(tmp_path):
    # input channel 0 is 1000x the others but barely used: one int8 scale for the first conv's input (its range set
    # by channel 0) crushes channels 1-2, which the output depends on; only the first conv reads the input
    model = tiny()
    with torch.no_grad():
        model[0].weight[:, 0] *= 1e-3
    calib = batches(3, seed=0)
    for x in calib:
        x[:, 0] *= 1e3
    report = prunekit.quantize(model, torch.randn(1, 3, 12, 12), calib_data=calib, out=tmp_path, keep_float_worst=1,
                               threads=1)
    ranked = [r["layer"] for r in report.sensitivity]
    assert sorted(ranked) == ["0", "3", "7"]
    assert ranked[0] == "0" and report.kept_float == ["0"]
    gains = [r["gain"] for r in report.sensitivity]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0.5
    assert report.rel_error < report.sensitivity[0]["rel_error_all_int8"]  # keeping it float helped
    # the ranking does not depend on the order the layers are tried in
    graph = load_onnx(report.float_path)
    feeds = [{"input": x.numpy()} for x in calib]
    reference, trial = trials("onnxruntime", Path(report.float_path), feeds, QuantizeConfig(threads=1), tmp_path)
    _, rows = layer_sensitivity(reference, trial, feeds, layers(graph)[::-1])
    assert [r.layer for r in rows] == ranked


@pytest.mark.parametrize("missing", ["openvino", "nncf"])
def test_a_missing_runtime_names_the_pip_install(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import -> ImportError
    with pytest.raises(ConfigError, match=rf"{missing} is not installed.*pip install 'prunekit\[quantize\]'") as e:
        prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), backend="openvino", calib_data=batches(1, 0),
                          out=tmp_path)
    assert f"pip install {missing}" in str(e.value)
    assert not (tmp_path / "model.onnx").exists()  # refused before any work


def test_corrupt_and_already_quantized_inputs_are_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="bad.onnx.*is not a valid ONNX model"):
        prunekit.quantize(bad, calib_data=batches(1, 0), out=tmp_path / "a")
    report = prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_data=batches(1, 0), out=tmp_path / "b")
    with pytest.raises(ConfigError, match="already quantized"):
        prunekit.quantize(report.int8_path, calib_data=batches(1, 0), out=tmp_path / "c")
    again = prunekit.quantize(report.float_path, calib_data=batches(1, 0), out=tmp_path / "d")  # a float file is fine
    assert int8_nodes(load_onnx(again.int8_path)) > 0


def test_all_float_and_unknown_layers_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="leaves all 3 quantizable layers in float"):
        prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_data=batches(1, 0), out=tmp_path,
                          keep_float=[".*"])
    with pytest.raises(ConfigError, match=r"keep_float: regex 'fc' matches no quantizable layer.*0, 3, 7"):
        prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_data=batches(1, 0), out=tmp_path,
                          keep_float=["fc"])
    with pytest.raises(ConfigError, match="calib_data gave no batch"):
        prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_data=[], out=tmp_path)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="'backend' = 'ov' is invalid"):
        QuantizeConfig(backend="ov")
    with pytest.raises(ConfigError, match="weight_type 'uint8' is an onnxruntime option"):
        QuantizeConfig(backend="openvino", weight_type="uint8")
    with pytest.raises(ConfigError, match="calib_batches"):
        prunekit.quantize(tiny(), torch.randn(1, 3, 12, 12), calib_batches=0, calib_data=[], out="unused")
    with pytest.raises(ConfigError, match="keep_float: '\\(' is not a valid regular expression"):
        QuantizeConfig(keep_float=["("])
    assert isinstance(prunekit.QuantizeConfig(), QuantizeConfig)


def test_stage_writes_a_run_directory(trained_run, tmp_path):
    from prunekit import runs
    from prunekit.pipeline.quantize import QuantizeStageConfig, quantize_run

    out = tmp_path / "q"
    cfg = QuantizeStageConfig.build({"from": str(trained_run), "out": str(out), "calib_batches": 2,
                                     "eval_batches": 3, "latency_runs": 4, "threads": 1})
    m = quantize_run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "log.txt", "metrics.json", "model.json",
                                                      "model.onnx", "model.safetensors", "model_int8.onnx",
                                                      "quantize.json"]
    saved = runs.read_metrics(out)
    assert saved["stage"] == "quantize" and saved["from"] == str(trained_run) and saved["backend"] == "onnxruntime"
    assert saved["test_samples"] == 3 * 64 and 0 <= saved["top1"] <= 100
    assert abs(saved["top1"] - saved["top1_float"]) <= 5  # int8 answers like float on the test split
    assert saved["latency"]["onnxruntime_int8"]["runs"] == 4 and saved["bytes_int8"] < saved["bytes_float"]
    assert m == saved
    model = runs.load_model(out, "cpu")  # the float model, loadable by report / profile / a later stage
    assert sum(p.numel() for p in model.parameters()) == saved["params"]
    assert runs.read_config(out)["backend"] == "onnxruntime"
    with pytest.raises(RunDirError, match="already holds a run; pass --overwrite"):
        quantize_run(cfg)


def test_stage_refuses_a_corrupt_run(trained_run, tmp_path):
    import shutil

    from prunekit.pipeline.quantize import QuantizeStageConfig, quantize_run

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    cfg = QuantizeStageConfig.build({"from": str(broken), "out": str(tmp_path / "q")})
    with pytest.raises(RunDirError):
        quantize_run(cfg)
