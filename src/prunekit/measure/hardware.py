"""Hardware-aware rounding: channel counts the runtime's kernels like, per backend (for ``--round-to auto``).

Why: a pruned layer with 37 channels runs no faster than one with 40 on kernels that work in blocks of 8 channels;
ONNX Runtime's CPU convolutions (MLAS NCHWc) and oneDNN process channels in blocks of the SIMD width (8 floats for
AVX2, 16 for AVX-512), and GPU tensor cores want multiples of 8 (fp16/bf16/tf32) or 16 (int8). Rounding the kept
channels to that block keeps the latency cut close to the MACs cut (see ``benchmarks/latency_rounding.py``).
ONNX Runtime's NCHWc convolutions go further: they compute output channels in sets of up to four blocks, so on a wide
CNN (ResNet-50) ``round_to = 4 * recommended_round_to(...)`` (64 with AVX-512) measured better on ONNX Runtime and
eager alike (docs/benchmarks/latency.md); it leaves layers of 64 channels or fewer whole, so narrow models keep
the block.

Example:
    >>> recommended_round_to("onnxruntime")        # 8 on an AVX2 machine, 16 with AVX-512
    >>> prune(model, inputs, ratio=0.5, round_to=recommended_round_to("onnxruntime"))
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from prunekit.errors import ConfigError

# (backend, dtype) -> channel multiple; "simd" means the CPU's vector width in elements of the dtype
_TABLE: dict[str, dict[str, int | str]] = {
    "eager": {"float32": "simd", "bfloat16": "simd", "int8": 16},
    "compile": {"float32": "simd", "bfloat16": "simd", "int8": 16},
    "onnxruntime": {"float32": "simd", "int8": 16},
    "cuda": {"float32": 8, "float16": 8, "bfloat16": 8, "int8": 16},
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (``/proc/cpuinfo`` on Linux; empty elsewhere)."""
    p = Path("/proc/cpuinfo")
    try:
        for line in p.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def simd_floats() -> int:
    """fp32 lanes of the widest vector unit the CPU has: 16 (AVX-512), 8 (AVX2/AVX), 4 (NEON/SSE)."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    if platform.machine().lower() in ("arm64", "aarch64") or "sse2" in flags:
        return 4
    return 8  # unknown CPU: 8 is a safe multiple for every common kernel


def recommended_round_to(backend: str = "onnxruntime", dtype: str = "float32") -> int:
    """The channel multiple to prune to for ``backend`` (eager, compile, onnxruntime, cuda) and ``dtype``.

    CPU backends: the SIMD width in elements (fp32: 8 with AVX2, 16 with AVX-512; at least 8 so blocked layouts
    stay full); ``cuda``: 8 (tensor cores, fp16/bf16/tf32), 16 for int8.
    """
    if backend not in _TABLE:
        raise ConfigError(f"--round-to auto: unknown backend {backend!r}; valid: {', '.join(sorted(_TABLE))}")
    row = _TABLE[backend]
    if dtype not in row:
        raise ConfigError(f"--round-to auto: dtype {dtype!r} is not in the table for {backend}; valid: "
                          f"{', '.join(sorted(row))}")
    v = row[dtype]
    if v == "simd":
        lanes = simd_floats() * (2 if dtype == "bfloat16" else 1)
        return max(8, lanes)
    return int(v)
