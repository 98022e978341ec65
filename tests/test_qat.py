"""Quantization-aware fine-tuning (prunekit.train.qat, ``prunekit finetune --qat``): the fake quantizers put weights on
ONNX Runtime's per-channel int8 grid and read input ranges, training moves the weights, convert gives a plain float
model back, and the stage writes an int8 model that runs and whose test accuracy sits beside the float and the
post-training int8 figures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError
from prunekit.train.qat import (
    QAT_LAYERS as QAT,
)
from prunekit.train.qat import (
    ActFakeQuant,
    activation_ranges,
    calibrate_qat,
    convert_qat,
    fake_quant_weight,
    prepare_qat,
)

pytest.importorskip("onnxruntime")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 10, 10, generator=g) for _ in range(n)]


def test_weight_fake_quant_is_the_per_channel_symmetric_grid():
    w = torch.tensor([[0.5, -1.27, 0.004], [2.0, 1.0, -0.013]])
    q = fake_quant_weight(w)
    scale = torch.tensor([1.27 / 127, 2.0 / 127])  # max |w| of each output channel / 127
    torch.testing.assert_close(q, (w / scale[:, None]).round().clamp(-127, 127) * scale[:, None])
    assert q[0, 2] == 0 and q[0, 1] == pytest.approx(-1.27)  # 0.004 is below half a step: 0; the max is kept
    w.requires_grad_(True)
    fake_quant_weight(w).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # straight through


def test_input_range_is_calibrated_then_averaged_and_fixed_in_eval():
    aq = ActFakeQuant(momentum=0.5)
    x = torch.tensor([-1.0, 0.0, 3.0])
    assert torch.equal(aq.eval()(x), x)  # no range yet: unchanged
    aq.observing = True
    aq(x)
    aq(torch.tensor([-2.0, 1.0]))
    assert (float(aq.lo), float(aq.hi)) == (-2.0, 3.0)  # calibration: min / max over the batches
    aq.observing = False
    aq.train()(torch.tensor([0.0, 5.0]))
    assert (float(aq.lo), float(aq.hi)) == (-1.0, 4.0)  # training: running average (momentum 0.5)
    aq.eval()(torch.tensor([-100.0, 100.0]))
    assert (float(aq.lo), float(aq.hi)) == (-1.0, 4.0)  # eval: fixed
    scale, zero, qmin, qmax = aq.qparams()
    assert scale == pytest.approx(5 / 255) and (zero, qmin, qmax) == (51, 0, 255)  # uint8, asymmetric (ORT)
    y = aq(torch.tensor([0.37, 9.0]))
    assert y[1] == pytest.approx(4.0, abs=1e-5) and abs(float(y[0]) - 0.37) <= scale / 2 + 1e-6


def test_openvino_scheme_is_symmetric_with_mean_per_sample_ranges():
    """NNCF's performance preset: symmetric inputs, lo / hi the mean over samples of per-sample min and max |x|,
    uint8 for a non-negative range, int8 [-128, 127] otherwise; values above the range are clipped."""
    aq = ActFakeQuant(momentum=0.5, scheme="openvino")
    aq.observing = True
    aq(torch.tensor([[0.0, 2.0], [1.0, 4.0]]))  # per-sample max |x|: 2, 4
    aq(torch.tensor([[0.5, 6.0]]))  # 6: the mean over the three samples is 4, not the max 6
    assert (float(aq.lo), float(aq.hi)) == pytest.approx((0.5, 4.0))  # per-sample min: 0, 1, 0.5
    assert aq.qparams() == pytest.approx((4.0 / 255, 0, 0, 255))  # non-negative: unsigned, zero point 0
    aq.observing = False
    y = aq.eval()(torch.tensor([1.0, 6.0]))
    assert y[1] == pytest.approx(4.0)  # clipped at the mean range
    signed = ActFakeQuant(scheme="openvino")
    signed.observing = True
    signed(torch.tensor([[-3.0, 1.0], [-1.0, 0.0]]))  # per-sample min -3, -1 (mean -2); max |x| 3, 1 (mean 2)
    assert signed.qparams() == pytest.approx((2.0 / 127, 0, -128, 127))  # symmetric int8
    with pytest.raises(ConfigError, match="onnxruntime, openvino"):
        ActFakeQuant(scheme="tensorrt")


def test_openvino_scheme_keeps_the_first_convolution_on_half_the_range():
    model = prepare_qat(tiny(), scheme="openvino")
    levels = {n: m.parametrizations.weight[0].levels for n, m in model.named_modules() if isinstance(m, QAT)}
    assert levels == {"0": 63, "2": 127, "6": 127}  # NNCF's overflow fix: the first conv's weights on 7 bits
    assert set(activation_ranges(model)) == {"0", "2", "4", "6"}  # NNCF quantizes the global pool's input too
    w = model[0].parametrizations.weight.original
    scale = w.detach().abs().flatten(1).amax(1) / 63
    torch.testing.assert_close(model[0].weight, (w / scale[:, None, None, None]).round() * scale[:, None, None, None])
    assert {m.scheme for m in model.modules() if isinstance(m, ActFakeQuant)} == {"openvino"}
    ort = prepare_qat(tiny())
    assert all(m.parametrizations.weight[0].levels == 127 for m in ort.modules() if isinstance(m, QAT))  # no half
    convert_qat(model)
    assert not any(isinstance(m, ActFakeQuant) for m in model.modules()) and not model[4]._forward_pre_hooks


def test_prepare_train_convert_changes_weights_and_gives_a_plain_model():
    model = tiny()
    source = copy.deepcopy(model)
    prepare_qat(model)
    assert set(activation_ranges(model)) == {"0", "2", "6"}
    assert calibrate_qat(model, batches(5), 3) == 3
    assert all(lo < hi for lo, hi in activation_ranges(model).values())
    with pytest.raises(ConfigError, match="already prepared"):
        prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for x in batches(3, seed=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
    convert_qat(model)
    assert sorted(model.state_dict()) == sorted(source.state_dict())  # same architecture, same keys
    assert not any(isinstance(m, ActFakeQuant) for m in model.modules())
    assert not torch.equal(model[0].weight, source[0].weight)  # training moved the weights
    for m in (model[0], model[2], model[6]):  # ...and they stay on their int8 grid
        torch.testing.assert_close(m.weight, fake_quant_weight(m.weight), rtol=0, atol=1e-7)
    with pytest.raises(ConfigError, match="not prepared"):
        convert_qat(model)


def test_onnxruntime_quantizes_the_trained_grid_exactly(tmp_path):
    """The weights QAT trained are the int8 weights ONNX Runtime's QDQ quantizer writes (no second rounding)."""
    import onnx
    from onnx import numpy_helper

    import prunekit

    model = tiny()
    prepare_qat(model)
    calibrate_qat(model, batches(2), 2)
    convert_qat(model).eval()
    prunekit.quantize(model, batches(1)[0][:1], "onnxruntime", calib_data=batches(2), out=tmp_path)
    graph = onnx.load(str(tmp_path / "model_int8.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    deq = {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8:
            q, scale = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            deq[q.shape] = q * scale.reshape(-1, *[1] * (q.ndim - 1))
    weights = [model[0].weight, model[2].weight, model[6].weight]
    assert len(deq) >= 2
    for w in weights:
        if tuple(w.shape) in deq:
            np.testing.assert_allclose(deq[tuple(w.shape)], w.detach().double().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_finetune_qat_writes_an_int8_run_with_its_accuracy(trained_run, tmp_path, backend):
    """The run for each backend; the openvino run trains with NNCF's scheme simulated (``qat_scheme``)."""
    from prunekit import runs
    from prunekit.pipeline.stages import FinetuneConfig, finetune
    from prunekit.quantize import accuracy, load_runner
    from prunekit.quantize.graph import int8_nodes, load_onnx
    from prunekit.quantize.ov import fake_quantize_ops

    if backend == "openvino":
        pytest.importorskip("nncf")
    out = tmp_path / "qat"
    cfg = FinetuneConfig.build({"from": str(trained_run), "out": str(out), "qat": True, "epochs": 1, "lr": 0.01,
                                "qat_calib_batches": 2, "qat_backend": backend, "qat_scheme": backend})
    m = finetune(cfg)
    files = {"model_int8.onnx"} if backend == "onnxruntime" else {"model_int8.xml", "model_int8.bin"}
    assert {"model.safetensors", "model.json", "quantize.json", "metrics.json", "config.yaml", "log.txt",
            *files} <= {p.name for p in out.iterdir()}
    assert runs.read_metrics(out) == m and m["qat"] is True and m["backend"] == backend
    assert f"({backend} scheme)" in (out / "log.txt").read_text()  # the fake quantization simulated this runtime
    for key in ("top1", "top1_float", "top1_start_float", "top1_ptq", "top1_fake_quant"):
        assert 0 <= m[key] <= 100, key
    assert m["top1_qat_gain"] == pytest.approx(m["top1"] - m["top1_ptq"])
    src, tuned = runs.load_model(trained_run), runs.load_model(out)
    changed = [k for k, v in tuned.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, src.state_dict()[k])]
    assert any(k.endswith("weight") for k in changed)  # the fine-tuning changed weights
    int8 = out / m["model_file"]
    assert (int8_nodes(load_onnx(int8)) if backend == "onnxruntime" else fake_quantize_ops(int8)) > 0
    test = runs.read_config(out)
    assert test["qat"] is True and test["qat_backend"] == backend
    ld = __import__("prunekit.pipeline.stages", fromlist=["loaders"]).loaders(
        {k: test[k] for k in ("dataset", "data_dir", "image_size")}, 64, splits=("test",))
    acc = accuracy(load_runner(int8, 1), ld["test"])
    assert acc["samples"] == m["test_samples"] and acc["top1"] == pytest.approx(m["top1"])


def test_qat_flags_are_a_section_of_finetune():
    from prunekit.pipeline.stages import FinetuneConfig

    keys = FinetuneConfig.keys()
    assert {"qat", "qat_backend", "qat_scheme", "qat_calib_batches", "qat_momentum"} <= set(keys)
    assert FinetuneConfig.build({"from": "x", "qat": True, "qat_backend": "openvino"}).qat.scheme == "onnxruntime"
    with pytest.raises(ConfigError, match="qat_scheme"):
        FinetuneConfig.build({"from": "x", "qat": True, "qat_scheme": "nncf"})
    with pytest.raises(ConfigError, match="qat_backend"):
        FinetuneConfig.build({"from": "x", "qat": True, "qat_backend": "tensorrt"})


def test_openvino_scheme_simulates_what_nncf_writes(tmp_path):
    """The fake-quantized torch model (openvino scheme) computes what NNCF's int8 IR computes, far closer than the
    onnxruntime scheme does: calibration samples of very different scales, so NNCF's mean per-sample range clips."""
    pytest.importorskip("nncf")
    import prunekit
    from prunekit.quantize import load_runner

    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 10, 10, generator=g) * torch.tensor([1.0, 1.0, 1.0, 6.0])[:, None, None, None]
             for _ in range(4)]
    model = tiny().eval()
    r = prunekit.quantize(model, calib[0][:1], "openvino", calib_data=calib, calib_batches=4, out=tmp_path)
    x = torch.cat(calib)
    int8 = torch.as_tensor(load_runner(r.int8_path, 1)({"input": x.numpy()})[0])
    gaps = {}
    for scheme in ("onnxruntime", "openvino"):
        fq = prepare_qat(copy.deepcopy(model), scheme=scheme)
        calibrate_qat(fq, calib, 4)
        with torch.no_grad():
            gaps[scheme] = float((fq.eval()(x) - int8).abs().mean())
    with torch.no_grad():
        float_gap = float((model(x) - int8).abs().mean())
    assert gaps["openvino"] < 0.5 * gaps["onnxruntime"] and gaps["openvino"] < 0.5 * float_gap, (gaps, float_gap)
