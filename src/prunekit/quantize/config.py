"""``QuantizeConfig``: static post-training int8 on a CPU runtime (ONNX Runtime or OpenVINO through NNCF).

One typed config, validated once; its fields are the flags of ``prunekit quantize`` (``--backend``,
``--calib-batches``, ``--keep-float`` ...), the YAML keys and the keyword shortcuts of ``prunekit.quantize``.

Example:
    >>> QuantizeConfig(backend="openvino", calib_batches=16, keep_float=["fc"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from prunekit.config import Config
from prunekit.errors import compile_patterns

BACKENDS = ("onnxruntime", "openvino")


class QuantizeConfig(Config):
    """Static post-training int8: weights per channel, activations calibrated on a few batches."""

    backend: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="the runtime the int8 model is for: onnxruntime (QDQ model, ONNX Runtime's "
        "quantizer) or openvino (OpenVINO IR, NNCF's quantizer)")
    calib_batches: int = Field(8, ge=1, description="calibration batches the activation ranges are read from")
    per_channel: bool = Field(True, description="one weight scale per output channel (else one per tensor)")
    activation_type: Literal["int8", "uint8"] = Field(
        "uint8", description="onnxruntime: type of the quantized activations; uint8 (u8s8) is what x86 int8 kernels "
        "(VNNI) multiply: ResNet-50 ran 2.2x faster than with int8 (s8s8) on an AVX-512 VNNI EPYC, same error "
        "(openvino: NNCF picks it from --preset)")
    weight_type: Literal["int8", "uint8"] = Field("int8", description="onnxruntime: type of the quantized weights "
                                                  "(openvino: always int8)")
    reduce_range: bool = Field(False, description="onnxruntime: 7-bit weights (can help accuracy on CPUs without "
                               "VNNI, whose int8 dot products may saturate)")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime: how activation ranges are read from the calibration batches")
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="openvino: NNCF preset, symmetric activations (performance) or asymmetric "
        "activations (mixed)")
    keep_float: list[str] = Field(default_factory=list, description="regexes of layers left in float: a torch "
                                  "module name or one of its parents (fc, layer4\\..*) or an ONNX node name")
    sensitivity: bool = Field(False, description="rank the layers by how much int8 hurts each (quantize all but "
                              "one, the model's output error on the calibration batches)")
    keep_float_worst: int = Field(0, ge=0, description="leave the N layers int8 hurts most in float (measures "
                                  "the sensitivity)")
    opset: int = Field(18, ge=13, description="ONNX opset of the float model that is quantized")
    threads: int = Field(2, ge=1, description="runtime threads when the int8 model is checked and evaluated")

    @field_validator("keep_float")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        compile_patterns(v, "keep_float")
        return v

    @model_validator(mode="after")
    def _backend_options(self) -> QuantizeConfig:
        if self.backend == "openvino":
            for name in ("weight_type", "activation_type", "calibrate_method"):
                default = type(self).model_fields[name].default
                if getattr(self, name) != default:
                    raise ValueError(f"{name} {getattr(self, name)!r} is an onnxruntime option; with backend "
                                     f"'openvino' NNCF chooses it (leave {name} at {default!r}, or use backend "
                                     "'onnxruntime')")
            if self.reduce_range:
                raise ValueError("reduce_range is an onnxruntime option; with backend 'openvino' leave it False")
        elif self.preset != "performance":
            raise ValueError(f"preset {self.preset!r} is an openvino option; with backend 'onnxruntime' use "
                             "activation_type")
        return self

    @property
    def measures_sensitivity(self) -> bool:
        return self.sensitivity or self.keep_float_worst > 0
