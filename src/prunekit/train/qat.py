"""Quantization-aware training: fake int8 in the torch model, shaped like ONNX Runtime's static QDQ quantizer.

What is simulated, per conv / linear layer (torch's own ``fake_quantize_*`` ops, straight-through gradients):

- the weight: int8 per output channel, symmetric, range [-127, 127], scale = max|w| / 127: exactly what ONNX
  Runtime's per-channel quantizer does. A BatchNorm folded into the conv later scales each output channel, and a
  per-channel grid scales with it, so the folded weight lands on the same int8 values;
- the layer's input: uint8 per tensor, asymmetric, its range a running min / max (the calibration batches first,
  then an average over training batches): ONNX Runtime's min-max calibration of a QDQ activation.

``prepare_qat(model)`` puts the fake quantizers in (weight parametrizations, an input hook), ``calibrate_qat`` reads
the first activation ranges, the model trains as usual, and ``convert_qat(model)`` takes them out again, leaving the
weights on their int8 grid: a plain float model of the same architecture, which ``prunekit.quantize`` exports and
quantizes for the runtime (its quantizer then finds the trained grid). Nothing here knows a runtime or a file.

Example:
    >>> prepare_qat(model)
    >>> calibrate_qat(model, calib_loader, batches=8)
    >>> fit(model, train_loader, val_loader, settings, loss_fn=make_kd_loss(float_model, 0.5, 2.0))
    >>> convert_qat(model)        # plain float weights on the int8 grid
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from prunekit.batch import call_model, split_batch, to_device
from prunekit.config import Config
from prunekit.errors import ConfigError

QAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ACT = "qat_input"  # the child module of a layer that fake-quantizes its input
_HOOK = "_qat_hook"


class QATArgs(Config):
    """Quantization-aware fine-tuning (a section of ``prunekit finetune``): fake int8 while training, distilled from
    the float model, then exported int8 for ``--qat-backend`` as ``prunekit quantize`` does."""

    qat: bool = Field(False, description="fake-quantized (int8) fine-tuning with KD from the float model (or from "
                      "--kd's teacher), then an int8 export for --qat-backend; metrics.json holds float, "
                      "post-training int8 and QAT int8 accuracy on the test split",
                      json_schema_extra={"flat": "qat"})
    backend: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="--qat: the runtime of the int8 model (onnxruntime: QDQ, what the fake "
        "quantization simulates; openvino: NNCF)", json_schema_extra={"flat": "qat_backend"})
    calib_batches: int = Field(8, ge=1, description="--qat: calibration batches (calib split) for the activation "
                               "ranges, before training and at the export", json_schema_extra={"flat":
                                                                                    "qat_calib_batches"})
    momentum: float = Field(0.01, gt=0, le=1, description="--qat: weight of a training batch in the running "
                            "activation ranges", json_schema_extra={"flat": "qat_momentum"})


# ----------------------------------------------------------------------------------------------- fake quantizers
def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in, ...) on its per-output-channel symmetric int8 grid (scale = max|w| / 127), straight-through
    gradient."""
    absmax = w.detach().abs().flatten(1).amax(dim=1)  # (out,)
    scale = (absmax / 127.0).clamp_min(1e-12).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


class WeightFakeQuant(nn.Module):
    """A parametrization: the layer sees its weight through ``fake_quant_weight``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w)


class ActFakeQuant(nn.Module):
    """Per-tensor uint8 fake quantization of an activation; its range a running min / max.

    The range is updated while the module is training (``momentum`` per batch) or observing (``calibrate_qat``: the
    min / max over the batches seen, as a min-max calibration does); in eval mode it is fixed. Before any range is
    read the input passes unchanged.
    """

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.observing = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    @property
    def ready(self) -> bool:
        return bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the range, widened to hold 0, as ONNX Runtime's uint8 min-max calibration."""
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max((hi - lo) / 255.0, 1e-12)
        return scale, int(min(max(round(-lo / scale), 0), 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or self.training:
            lo, hi = x.detach().min().float(), x.detach().max().float()
            if self.observing or not self.ready:
                self.lo.copy_(torch.minimum(self.lo, lo))
                self.hi.copy_(torch.maximum(self.hi, hi))
            else:
                self.lo.lerp_(lo, self.momentum)
                self.hi.lerp_(hi, self.momentum)
        if not self.ready:
            return x
        scale, zero = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, _ACT)(args[0]), *args[1:])


# ----------------------------------------------------------------------------------------------- lifecycle
def qat_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``prepare_qat`` fake-quantizes (conv and linear layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]


def is_prepared(model: nn.Module) -> bool:
    return any(hasattr(m, _ACT) for m in model.modules())


def prepare_qat(model: nn.Module, momentum: float = 0.01) -> nn.Module:
    """Fake-quantize the weight and the input of every conv / linear layer of ``model`` (in place); returns it.

    Raises:
        ConfigError: no conv / linear layer, or the model is already prepared.
    """
    if is_prepared(model):
        raise ConfigError("prepare_qat: the model is already prepared for QAT (call convert_qat first)")
    names = qat_layers(model)
    if not names:
        raise ConfigError("prepare_qat: the model has no conv or linear layer to quantize")
    for m in model.modules():
        if isinstance(m, QAT_LAYERS):
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
            m.add_module(_ACT, ActFakeQuant(momentum).to(m.weight.device))
            setattr(m, _HOOK, m.register_forward_pre_hook(_input_hook))
    return model


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches: Iterable, n: int, device: str | torch.device = "cpu") -> int:
    """Read the input ranges of a prepared model from the first ``n`` batches (eval mode: BatchNorm statistics stay
    as they are); returns the number of batches read."""
    quants = [m for m in model.modules() if isinstance(m, ActFakeQuant)]
    if not quants:
        raise ConfigError("calibrate_qat: the model is not prepared for QAT (call prepare_qat first)")
    was_training = model.training
    model.eval()
    for q in quants:
        q.observing = True
    seen = 0
    try:
        for batch in batches:
            if seen >= n:
                break
            inputs, _ = split_batch(batch)
            call_model(model, to_device(inputs, device))
            seen += 1
    finally:
        for q in quants:
            q.observing = False
        model.train(was_training)
    if not seen:
        raise ConfigError("calibrate_qat: the calibration data gave no batch")
    return seen


def convert_qat(model: nn.Module) -> nn.Module:
    """Take the fake quantizers out (in place): weights stay on their int8 grid, inputs are float again; returns
    the plain float model (same architecture and state-dict keys as before ``prepare_qat``)."""
    if not is_prepared(model):
        raise ConfigError("convert_qat: the model is not prepared for QAT")
    for m in model.modules():
        if isinstance(m, QAT_LAYERS) and hasattr(m, _ACT):
            getattr(m, _HOOK).remove()
            delattr(m, _HOOK)
            delattr(m, _ACT)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer: (min, max)}`` of the input ranges a prepared model holds (for logs and tests)."""
    return {n.removesuffix(f".{_ACT}"): (float(m.lo), float(m.hi)) for n, m in model.named_modules()
            if isinstance(m, ActFakeQuant)}

