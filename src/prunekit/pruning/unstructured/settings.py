"""``SparsifySettings``: every option of unstructured pruning, validated once (also the base of the CLI config)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from prunekit.config import Config
from prunekit.errors import ConfigError
from prunekit.pruning.unstructured.methods import METHODS, get_method
from prunekit.pruning.unstructured.patterns import parse_nm

log = logging.getLogger(__name__)
DEFAULT_SPARSITY = 0.5
FIXED_BY_PATTERN = ("nm", "pattern")  # structures whose pattern sets the sparsity


class SparsifySettings(Config):
    """Options of ``prunekit.pruning.unstructured.sparsify`` (and of ``prunekit sparsify``)."""

    method: str = Field("l1", description="l1, global, taylor, movement, random, nm, kernel, intra-kernel; "
                        "decoder LMs: wanda, sparsegpt (with --sparsity: unstructured; without: N:M by --nm)")
    sparsity: float | None = Field(None, description="fraction of the weights of the selected layers set to zero, "
                                   "in [0, 1) (default 0.5; nm and intra-kernel: set by the pattern)")
    nm: str = Field("2:4", description="N:M pattern of the nm method: keep N of every M weights along the input "
                    "dimension")
    nm_fallback: Literal["dense", "pad"] = Field("dense", description="nm: layers whose input size is not a multiple "
                                                 "of M are left dense (listed in a warning) or zero-padded")
    scope: Literal["layer", "global"] | None = Field(None, description="element methods: each layer to the "
                                                     "sparsity, or one threshold across layers (default: the "
                                                     "method's; global for 'global', else layer)")
    pattern_keep: int = Field(4, ge=1, description="intra-kernel: kernel positions kept (of 9 for 3x3)")
    patterns: int = Field(8, ge=1, description="intra-kernel: patterns allowed per layer (the most frequent ones)")
    only: list[str] = Field(default_factory=list, description="regexes of layer names: sparsify only these")
    ignore: list[str] = Field(default_factory=list, description="regexes of layer names never sparsified")
    dense_first_last: bool = Field(True, description="leave the first layer and the classifier dense (the usual "
                                   "practice: they are small and sensitive)")
    calib_batches: int = Field(8, ge=1, description="taylor: labelled calibration batches per pruning step "
                               "(and BatchNorm recalibration batches); wanda / sparsegpt: token batches used")
    seed: int = Field(0, description="random seed (random method, data order)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        METHODS.get(v)  # ConfigError listing the valid names
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v < 1:
            raise ValueError("sparsity is the fraction of weights zeroed and must be in [0, 1), e.g. 0.5 or 0.9")
        return v

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str) -> str:
        parse_nm(v)  # ValueError naming the rule
        return v

    @field_validator("only", "ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression: {e}") from None
        return v

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> SparsifySettings:
        cfg = super().build(values, source)
        cfg.check_consistent(source)
        return cfg

    def check_consistent(self, source: str = "config") -> None:
        """Cross-option rules (a ``ConfigError`` naming the options and the fix)."""
        structure = self.structure
        if get_method(self.method).nm_capable:
            if self.sparsity is not None and "nm" in self.model_fields_set:
                raise ConfigError(f"{source}: method {self.method!r} takes --sparsity {self.sparsity} (unstructured) "
                                  f"or --nm {self.nm} (N:M), not both; drop one")
            if self.scope == "global":
                raise ConfigError(f"{source}: method {self.method!r} prunes each layer to the sparsity (Wanda: each "
                                  "output row); --scope global is not supported, drop it")
        given = self.model_fields_set
        for key, used_by in (("nm", "nm"), ("nm_fallback", "nm"), ("pattern_keep", "pattern"), ("patterns", "pattern")):
            if key in given and structure != used_by:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(f"{source}: {flag} {getattr(self, key)} does not apply to method {self.method!r} "
                                  f"(it shapes {'N:M' if used_by == 'nm' else 'intra-kernel'} pruning only); drop "
                                  f"{flag}")
        if structure in FIXED_BY_PATTERN and self.sparsity is not None and abs(self.sparsity - self.fixed()) > 1e-9:
            how = f"--nm {self.nm}" if structure == "nm" else f"--pattern-keep {self.pattern_keep} (of 9 for 3x3)"
            raise ConfigError(f"{source}: --sparsity {self.sparsity} does not apply to method {self.method!r}: its "
                              f"pattern sets the sparsity of the layers it prunes ({how}: {self.fixed():.4g}); "
                              "drop --sparsity")
        if self.scope is not None and structure in FIXED_BY_PATTERN:
            raise ConfigError(f"{source}: --scope {self.scope} does not apply to method {self.method!r} (every layer "
                              "gets the same pattern); drop --scope")
        if self.scope == "global" and structure == "kernel":
            raise ConfigError(f"{source}: --scope global is not supported by method 'kernel' (kernels of different "
                              "sizes are not comparable); drop --scope")
        if self.scope == "layer" and self.method == "global":
            raise ConfigError(f"{source}: --scope layer contradicts method 'global' (one threshold across layers); "
                              "use method 'l1' for layer-wise magnitude, or drop --scope")

    # --------------------------------------------------------------------------------------- derived
    @property
    def structure(self) -> str:
        method = get_method(self.method)
        if method.nm_capable and self.sparsity is None:  # wanda / sparsegpt without --sparsity: N:M (--nm)
            return "nm"
        return method.structure

    @property
    def nm_pair(self) -> tuple[int, int]:
        return parse_nm(self.nm)

    @property
    def resolved_scope(self) -> str:
        return self.scope or get_method(self.method).scope

    def fixed(self) -> float:
        """The sparsity of a pruned layer for pattern methods (nm: 1 - N/M; intra-kernel: 1 - keep/9)."""
        if self.structure == "nm":
            n, m = self.nm_pair
            return 1 - n / m
        return 1 - self.pattern_keep / 9

    def target(self) -> float:
        """The final sparsity asked for (in the layers the method prunes)."""
        if self.structure in FIXED_BY_PATTERN:
            return self.fixed()
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
