"""``StructuredConfig``: every option of structured pruning, in sections, validated once.

The same object comes from Python (``StructuredConfig(...)`` or keyword shortcuts of ``prunekit.prune``), from
``prunekit prune`` flags and from a YAML recipe: the flags and keys are the sections' generated flat keys
(``prunekit.config``). Each default lives here and only here.

Example:
    >>> cfg = StructuredConfig(criterion="variance", target=Target(macs=0.5), compensation=Compensation(mode="lstsq"))
    >>> cfg == StructuredConfig.build({"criterion": "variance", "target_macs": 0.5, "compensate": "lstsq"})
    True
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from prunekit.config import Config
from prunekit.errors import unknown_name_message

AUTO_CRITERION = "auto"
# what criterion="auto" and compensate="auto" resolve to: the winners on the mean over five model families (three CNNs,
# a ViT, MiniLM), right after pruning; benchmarks/defaults.py, docs/defaults.md
AUTO_WITH_DATA, AUTO_WITHOUT_DATA = "variance", "l2"


def _flat(key: str) -> dict[str, str]:
    return {"flat": key}


class Target(Config):
    """What to reach: one of a channel ratio (or keep), a MACs fraction or a latency fraction."""

    flat_prefix = "target_"
    ratio: float | None = Field(None, gt=0, lt=1, json_schema_extra=_flat("ratio"),
                                description="fraction of channels removed (default 0.5 when no other target)")
    keep: float | None = Field(None, gt=0, lt=1, json_schema_extra=_flat("keep"),
                               description="fraction of channels kept: another way to say --ratio (keep = 1 - ratio), "
                               "as papers do (VBP's keep=0.65 is ratio 0.35)")
    macs: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to keep; the global ratio is searched "
                               "until the pruned model is within 1 percent of it (replaces --ratio)")
    latency: float | None = Field(None, gt=0, lt=1, description="fraction of the dense latency to keep on "
                                  "--latency-backend (default eager), predicted from a per-layer latency table "
                                  "measured once and cached, checked by a paired timing (replaces --ratio)")

    @model_validator(mode="before")
    @classmethod
    def _keep_to_ratio(cls, data: Any) -> Any:
        """``keep`` is only a spelling of ``ratio``: it becomes ``ratio = 1 - keep`` and is not stored, so every
        consumer (PAT steps, adaptive trials, reports, the resolved recipe) reads one value."""
        if not isinstance(data, dict) or data.get("keep") is None:
            return data
        keep, given = data["keep"], data.get("ratio")
        value = _number(keep)
        if value is None or not 0 < value < 1:
            raise ValueError(f"`keep` = {keep!r} is invalid: the fraction of channels kept must be a number in (0, 1)")
        ratio = round(1.0 - value, 12)
        for other, flat in (("macs", "target_macs"), ("latency", "target_latency")):
            if data.get(other) is not None:
                raise ValueError(f"can't provide both `keep` ({keep}) and `{flat}` ({data[other]}); choose one")
        if given is not None and (_number(given) is None or abs(_number(given) - ratio) > 1e-9):
            raise ValueError(f"`keep` ({keep}) and `ratio` ({given}) disagree (keep = 1 - ratio); give one of them")
        return {**data, "ratio": ratio, "keep": None}

    @model_validator(mode="after")
    def _one_target(self) -> Target:
        given = [(k, v) for k, v in (("target_latency", self.latency), ("ratio", self.ratio),
                                     ("target_macs", self.macs)) if v is not None]
        if len(given) > 1:
            (a, va), (b, vb) = given[:2]
            raise ValueError(f"can't provide both `{a}` ({va}) and `{b}` ({vb}). Choose one.")
        return self

    @property
    def global_ratio(self) -> float:
        return 0.5 if self.ratio is None else self.ratio


class Layers(Config):
    """Which layers are pruned, and how the amount is spread over them."""

    scope: Literal["global", "local", "adaptive"] = Field(
        "global", description="global: one threshold over all layers; local: the same ratio in every layer; "
        "adaptive: per-layer ratios from each layer's measured damage to the output (calibration data; see "
        "prunekit.pruning.structured.allocate)")
    normalize: Literal["mean", "max", "none"] = Field("mean", description="per-layer score normalisation "
                                                      "before global ranking")
    preset: str | None = Field(None, description="which layers to prune: mlp-only (transformer MLPs) or interior "
                               "(CNN block-internal channels)")
    ignore: list[str] = Field(default_factory=list, description="regexes of module names never pruned")
    only: list[str] = Field(default_factory=list, description="regexes of module names: prune only these")
    ratio_overrides: dict[str, float] = Field(default_factory=dict, description="per-layer ratios by module-name "
                                              "regex, e.g. 'layer1\\..*=0.3'")
    ratio_caps: dict[str, float] = Field(default_factory=dict, description="per-layer maximum ratios by module-name "
                                         "regex (e.g. from `prunekit sensitivity`); 0 = never prune it")
    max_ratio: float = Field(0.9, gt=0, le=1, description="no layer loses more than this fraction of its channels")
    round_to: int | None = Field(None, ge=1, description="round kept channels to a multiple of this")
    round_to_wide: int | None = Field(None, ge=1, description="layers keeping at least this many channels are "
                                      "rounded to a multiple of it instead of --round-to (ONNX Runtime's CPU "
                                      "convolutions compute output channels in sets of 4 SIMD blocks: 64 with "
                                      "AVX-512, 32 with AVX2, i.e. 4 x recommended_round_to('onnxruntime'))")
    heads: bool = Field(False, description="remove whole attention heads (timm and HF BERT-style attention, and "
                        "layouts declared with prunekit.register_attention)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        from prunekit.pruning.structured.presets import PRESETS

        if v is not None:
            PRESETS.get(v)
        return v

    @field_validator("ignore", "only", mode="before")
    @classmethod
    def _one_regex(cls, v: Any) -> Any:
        """``only="layer3"`` is one regex, not a list of one-letter regexes."""
        return [v] if isinstance(v, str) else list(v) if isinstance(v, tuple) else v

    @field_validator("ignore", "only")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            _compile(p)
        return v

    @field_validator("ratio_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, float]) -> dict[str, float]:
        for p, r in v.items():
            _compile(p)
            if not 0 < r < 1:
                raise ValueError(f"ratio {r} for {p!r} must be in (0, 1)")
        return v

    @field_validator("ratio_caps")
    @classmethod
    def _caps(cls, v: dict[str, float]) -> dict[str, float]:
        for p, r in v.items():
            _compile(p)
            if not 0 <= r <= 1:
                raise ValueError(f"cap {r} for {p!r} must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _wide_multiple(self) -> Layers:
        if self.round_to_wide is not None and self.round_to is not None and self.round_to_wide % self.round_to:
            raise ValueError(f"`round_to_wide` ({self.round_to_wide}) must be a multiple of `round_to` "
                             f"({self.round_to}), e.g. {4 * self.round_to}")
        return self


class Calibration(Config):
    """How the calibration data (unlabelled batches, ``calib_data=``) is used."""

    flat_prefix = "calib_"
    batches: int = Field(50, ge=1, description="calibration batches (data-driven criteria, statistics, "
                         "compensation, BN re-estimation, reconstruction)")
    recalibrate_bn: bool | None = Field(None, json_schema_extra=_flat("recalibrate_bn"),
                                        description="re-estimate every BatchNorm's running statistics on "
                                        "--calib-batches calibration batches after pruning (and after compensation, "
                                        "which it keeps); default: whenever there is calibration data and the model "
                                        "has BatchNorm")


class Compensation(Config):
    """How the layers that read pruned channels make up for them (needs calibration data)."""

    mode: Literal["auto", "none", "mean", "lstsq"] = Field(
        "auto", json_schema_extra=_flat("compensate"),
        description="auto: lstsq when calibration data is given, else none; mean: VBP's bias compensation of each "
        "consumer; lstsq: least-squares refit of each consumer's kept weights and bias on the calibration "
        "statistics; none")
    refit: bool | None = Field(None, json_schema_extra=_flat("refit"),
                               description="after compensation, refit each pruned block's consumer layers (Linear "
                               "layers inside a block: transformer FFNs) in closed form so that the block's output "
                               "(the norm after it) matches the dense model's on the calibration data, correcting what "
                               "earlier layers lost too (seconds, where reconstruct_steps takes minutes: "
                               "prunekit.pruning.structured.reconstruct_closed); default: on when compensation is "
                               "lstsq (never worse in five model families, +0.004 to +0.025 cosine on MiniLM)")


class Reconstruction(Config):
    """Block-wise reconstruction after pruning (off unless ``steps`` > 0)."""

    flat_prefix = "reconstruct_"
    steps: int = Field(0, ge=0, description="block-wise reconstruction after pruning: this many Adam steps per "
                       "block fit each block's pruned layers to the dense model's block output on the calibration "
                       "data (no labels; the held-out error never rises); 0: off. "
                       "See prunekit.pruning.structured.reconstruct")
    lr: float = Field(0.01, gt=0, description="reconstruction step size, relative to each parameter's RMS")
    train: Literal["pruned", "block"] = Field(
        "pruned", description="what the reconstruction fits: pruned (the block's pruned layers) or block (every "
        "parameter of the block: norms, attention, unpruned layers too; fits more: pair it with "
        "--reconstruct-augment on a small calibration set)")
    input_mix: float = Field(0.0, ge=0, lt=1, description="probability that a reconstruction step feeds each "
                             "element of the dense model's block input instead of the pruned model's (QDrop-style; "
                             "any block type): the fit sees inputs between the two, against over-fitting; 0: pruned "
                             "inputs only")
    augment: int = Field(0, ge=0, description="token batches only: this many perturbed copies of each calibration "
                         "batch the reconstruction fits on (each token but the first and last swapped, with "
                         "probability 0.3, for a token drawn from the same batch) join the fit, against "
                         "over-fitting a small calibration set; the held-out batches stay clean; 0: off")

    @model_validator(mode="after")
    def _needs_steps(self) -> Reconstruction:
        """Options that shape a reconstruction that does not run would silently do nothing."""
        if self.steps:
            return self
        for key, value, off in (("reconstruct_augment", self.augment, 0), ("reconstruct_input_mix",
                                self.input_mix, 0.0), ("reconstruct_train", self.train, "pruned")):
            if value != off:
                raise ValueError(f"{key}={value!r} shapes the reconstruction, but reconstruct_steps=0 (off): set "
                                 f"reconstruct_steps > 0 or leave {key}={off!r}")
        return self


class Latency(Config):
    """Widths from a measured per-layer latency table of one backend."""

    flat_prefix = "latency_"
    backend: Literal["eager", "onnxruntime", "onnxruntime-int8", "openvino-int8"] | None = Field(
        None, description="choose each group's kept channel count from a per-layer latency table of this backend "
        "(the top of the latency step, never just past a step edge; onnxruntime-int8 / openvino-int8: the layers "
        "quantized as prunekit quantize does); see prunekit.pruning.structured.latency")
    threads: int = Field(2, ge=1, description="threads the latency table and the paired check are timed with")
    verify_runs: int = Field(20, ge=0, description="with --latency-backend: time dense vs pruned alternately this "
                             "many runs each and report predicted vs measured (0: skip)")
    context_groups: int = Field(0, ge=0, description="with --latency-backend: time the whole model at the table's "
                                "width and one grid step below/above for the N costliest groups, keep the best")


class StructuredConfig(Config):
    """Structured pruning (channels, heads; VBP's variance criteria with compensation): ``prunekit.prune``'s
    config, ``prunekit prune``'s flags and a recipe's ``prune`` stage."""

    criterion: str = Field("auto", description="channel scoring rule: auto (variance with calibration data, else "
                           "l2: the best on the mean over five model families, docs/defaults.md), l1, l2, bn_scale, "
                           "lamp, fpgm, random, taylor (labelled data), variance, variance_weighted, "
                           "variance_conditional (data); see prunekit.pruning.list_criteria()")
    target: Target = Field(default_factory=Target, description="what to reach")
    layers: Layers = Field(default_factory=Layers, description="which layers, and how the amount is spread")
    calibration: Calibration = Field(default_factory=Calibration, description="use of the calibration data")
    compensation: Compensation = Field(default_factory=Compensation, description="consumers' compensation")
    reconstruction: Reconstruction = Field(default_factory=Reconstruction, description="block reconstruction")
    latency: Latency = Field(default_factory=Latency, description="latency-table widths")
    seed: int = Field(0, description="seed of the random criterion and of the reconstruction's batch order "
                      "and augmentation noise")

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str) -> str:
        from prunekit.pruning.structured.criteria import CRITERIA

        if v != AUTO_CRITERION and v not in CRITERIA:
            raise ValueError(unknown_name_message("criterion", v, [AUTO_CRITERION, *CRITERIA.names()]))
        return v

    @model_validator(mode="after")
    def _latency_target(self) -> StructuredConfig:
        if self.layers.scope == "adaptive" and self.target.macs is not None:
            raise ValueError(f"scope='adaptive' allocates a channel ratio; it cannot be combined with `target_macs` "
                             f"({self.target.macs}): give `ratio`, or use scope global/local with `target_macs`")
        if self.target.latency is None:
            return self
        if self.layers.scope == "adaptive":
            raise ValueError(f"`target_latency` works with scope global or local, not {self.layers.scope!r}")
        if self.latency.backend is None:  # the target is measured on a backend: eager unless told
            object.__setattr__(self.latency, "backend", "eager")
        return self

    @property
    def global_ratio(self) -> float:
        return self.target.global_ratio


PruneSettings = StructuredConfig  # the name before the sections (prunekit <= 0.1)


def _number(v: Any) -> float | None:
    """``v`` as a float (numbers, or strings from the command line), ``None`` if it is not one."""
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _compile(p: str) -> None:
    try:
        re.compile(p)
    except re.error as e:
        raise ValueError(f"{p!r} is not a valid regular expression: {e}") from None
