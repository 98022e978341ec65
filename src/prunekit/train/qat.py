"""Quantization-aware training: fake int8 in the torch model, shaped like the runtime's static quantizer.

What is simulated, per conv / linear layer (torch's own ``fake_quantize_*`` ops, straight-through gradients), for
``scheme="onnxruntime"`` (ONNX Runtime's QDQ quantizer, ``prunekit quantize``'s defaults):

- the weight: int8 per output channel, symmetric, range [-127, 127], scale = max|w| / 127: exactly what ONNX
  Runtime's per-channel quantizer does. A BatchNorm folded into the conv later scales each output channel, and a
  per-channel grid scales with it, so the folded weight lands on the same int8 values;
- the layer's input: uint8 per tensor, asymmetric, its range a running min / max (the calibration batches first,
  then an average over training batches): ONNX Runtime's min-max calibration of a QDQ activation.

``scheme="openvino"`` simulates NNCF's default (``performance`` preset): the same weight grid, except the first
convolution, whose weights NNCF keeps on half the int8 range (its overflow fix: scale = max|w| / 63); inputs
symmetric per tensor, uint8 [0, 255] (scale = high / 255) where the range holds no negative value, else int8
[-128, 127] (scale = high / 127), ``high`` the *mean over samples* of each sample's max |x| (NNCF's mean min-max
estimator; values above it are clipped); the inputs of average pooling layers too. Not simulated: the inputs of
residual additions (NNCF quantizes them too; they are no module) and NNCF's bias correction after quantizing.

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
# NNCF also quantizes the input of average pooling (the global pool before a classifier): openvino scheme only
POOL_LAYERS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
               nn.AvgPool3d)
SCHEMES = ("onnxruntime", "openvino")
Scheme = Literal["onnxruntime", "openvino"]
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
        "onnxruntime", description="--qat: the runtime of the int8 model (onnxruntime: QDQ; openvino: NNCF)",
        json_schema_extra={"flat": "qat_backend"})
    scheme: Scheme = Field(
        "onnxruntime", description="--qat: the quantizer the fake quantization simulates (onnxruntime: QDQ, uint8 "
        "min-max inputs; openvino: NNCF's performance preset, symmetric inputs on mean per-sample ranges, a "
        "half-range first convolution); on a Fashion-MNIST ResNet-20 exported to OpenVINO the onnxruntime scheme "
        "gave the better int8 model", json_schema_extra={"flat": "qat_scheme"})
    calib_batches: int = Field(8, ge=1, description="--qat: calibration batches (calib split) for the activation "
                               "ranges, before training and at the export", json_schema_extra={"flat":
                                                                                    "qat_calib_batches"})
    momentum: float = Field(0.01, gt=0, le=1, description="--qat: weight of a training batch in the running "
                            "activation ranges", json_schema_extra={"flat": "qat_momentum"})


# ----------------------------------------------------------------------------------------------- fake quantizers
def fake_quant_weight(w: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """``w`` (out, in, ...) on its per-output-channel symmetric int8 grid (scale = max|w| / ``levels``: 127, or 63
    for NNCF's half-range first layer), straight-through gradient."""
    absmax = w.detach().abs().flatten(1).amax(dim=1)  # (out,)
    scale = (absmax / levels).clamp_min(1e-12).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


class WeightFakeQuant(nn.Module):
    """A parametrization: the layer sees its weight through ``fake_quant_weight``."""

    def __init__(self, levels: int = 127):
        super().__init__()
        self.levels = levels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.levels)


class ActFakeQuant(nn.Module):
    """Per-tensor int8 fake quantization of an activation; its range a running estimate.

    ``scheme="onnxruntime"``: uint8, asymmetric, range the min / max of the calibration batches. ``"openvino"``:
    symmetric, ``lo`` / ``hi`` the mean over samples of each sample's min and max |x|, uint8 when ``lo`` >= 0 else
    int8. The range is updated while the module is training (``momentum`` per batch) or observing
    (``calibrate_qat``); in eval mode it is fixed. Before any range is read the input passes unchanged.
    """

    def __init__(self, momentum: float = 0.01, scheme: Scheme = "onnxruntime"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ConfigError(f"qat scheme {scheme!r} is not known; choose one of {', '.join(SCHEMES)}")
        self.momentum, self.scheme = momentum, scheme
        self.observing = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("seen", torch.tensor(0.0))  # samples averaged into lo / hi while observing (openvino)

    @property
    def ready(self) -> bool:
        return bool(torch.isfinite(self.lo)) and bool(torch.isfinite(self.hi))

    def qparams(self) -> tuple[float, int, int, int]:
        """(scale, zero point, lowest, highest integer) of the range, as the runtime's quantizer derives them."""
        if self.scheme == "openvino":  # symmetric: NNCF's unsigned [0, hi] or signed [-hi * 128/127, hi]
            hi = max(float(self.hi), 1e-12)
            return (hi / 255.0, 0, 0, 255) if float(self.lo) >= 0 else (hi / 127.0, 0, -128, 127)
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)  # ONNX Runtime: widened to hold 0
        scale = max((hi - lo) / 255.0, 1e-12)
        return scale, int(min(max(round(-lo / scale), 0), 255)), 0, 255

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of a batch: min / max (onnxruntime), or the means of per-sample min / max |x| (openvino)."""
        x = x.detach().float()
        if self.scheme == "openvino":
            flat = x.flatten(1) if x.dim() > 1 else x[None]
            return flat.amin(dim=1).mean(), flat.abs().amax(dim=1).mean()
        return x.min(), x.max()

    def _observe(self, lo: torch.Tensor, hi: torch.Tensor, n: int) -> None:
        if self.scheme == "openvino":  # a running mean over the samples seen
            w = n / (float(self.seen) + n)
            self.lo.copy_(lo if not self.ready else self.lo.lerp(lo, w))
            self.hi.copy_(hi if not self.ready else self.hi.lerp(hi, w))
            self.seen += n
        else:
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or self.training:
            lo, hi = self._stats(x)
            if self.observing or not self.ready:
                self._observe(lo, hi, int(x.shape[0]) if x.dim() > 1 else 1)
            else:
                self.lo.lerp_(lo, self.momentum)
                self.hi.lerp_(hi, self.momentum)
        if not self.ready:
            return x
        scale, zero, qmin, qmax = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, _ACT)(args[0]), *args[1:])


def _add_input_quant(module: nn.Module, quant: ActFakeQuant) -> None:
    module.add_module(_ACT, quant)
    setattr(module, _HOOK, module.register_forward_pre_hook(_input_hook))


# ----------------------------------------------------------------------------------------------- lifecycle
def qat_layers(model: nn.Module) -> list[str]:
    """Names of the layers ``prepare_qat`` fake-quantizes (conv and linear layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]


def is_prepared(model: nn.Module) -> bool:
    return any(hasattr(m, _ACT) for m in model.modules())


def prepare_qat(model: nn.Module, momentum: float = 0.01, scheme: Scheme = "onnxruntime") -> nn.Module:
    """Fake-quantize the weight and the input of every conv / linear layer of ``model`` (in place) as ``scheme``'s
    quantizer will (``"onnxruntime"`` or ``"openvino"``, see the module's docstring); returns it.

    Raises:
        ConfigError: no conv / linear layer, or the model is already prepared.
    """
    if is_prepared(model):
        raise ConfigError("prepare_qat: the model is already prepared for QAT (call convert_qat first)")
    names = qat_layers(model)
    if not names:
        raise ConfigError("prepare_qat: the model has no conv or linear layer to quantize")
    if scheme not in SCHEMES:
        raise ConfigError(f"prepare_qat: scheme {scheme!r} is not known; choose one of {', '.join(SCHEMES)}")
    first = next(m for m in model.modules() if isinstance(m, QAT_LAYERS))
    for m in model.modules():
        if isinstance(m, QAT_LAYERS):
            half = scheme == "openvino" and m is first and not isinstance(m, nn.Linear)  # NNCF's overflow fix
            parametrize.register_parametrization(m, "weight", WeightFakeQuant(63 if half else 127))
            _add_input_quant(m, ActFakeQuant(momentum, scheme).to(m.weight.device))
        elif scheme == "openvino" and isinstance(m, POOL_LAYERS):
            _add_input_quant(m, ActFakeQuant(momentum, scheme).to(first.weight.device))
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
        if hasattr(m, _ACT):
            getattr(m, _HOOK).remove()
            delattr(m, _HOOK)
            delattr(m, _ACT)
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer: (min, max)}`` of the input ranges a prepared model holds (for logs and tests)."""
    return {n.removesuffix(f".{_ACT}"): (float(m.lo), float(m.hi)) for n, m in model.named_modules()
            if isinstance(m, ActFakeQuant)}

