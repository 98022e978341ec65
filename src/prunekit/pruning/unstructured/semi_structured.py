"""2:4 weights on sparse tensor cores: ``torch.sparse.to_sparse_semi_structured`` and a dense-vs-2:4 latency.

Only here does sparsity buy speed: NVIDIA GPUs of compute capability 8.0+ (Ampere, Hopper, ...) multiply a 2:4
sparse matrix by a dense one about twice as fast in fp16/bf16/int8. PyTorch exposes it for 2-D weights of linear
layers (cuSPARSELt, else CUTLASS); convolutions are not accelerated this way. Everywhere else ``measure_2to4_latency``
returns ``{"measured": False, "reason": ...}`` and the report says why no speed-up is claimed.
"""

from __future__ import annotations

import copy
import logging
import statistics
from typing import Any

import torch
from torch import nn

from prunekit.measure.macs import call_model
from prunekit.pruning.unstructured.masks import fold_masks
from prunekit.pruning.unstructured.patterns import nm_violations

log = logging.getLogger(__name__)


def semi_structured_support() -> tuple[bool, str]:
    """(True, device name) where 2:4 sparse tensor cores can be used, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, ("no CUDA device: 2:4 sparsity is only accelerated by NVIDIA sparse tensor cores (compute "
                       "capability 8.0+, Ampere or newer), so no speed-up is claimed; on the CPU the 2:4 model runs "
                       "dense kernels at the dense cost")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if major < 8:
        return False, (f"{name} has compute capability {major}.{minor}; 2:4 sparse tensor cores need 8.0+ (Ampere "
                       "or newer), so no speed-up is claimed")
    return True, name


def _backend() -> type:
    """cuSPARSELt when this torch build has it, else CUTLASS (what ``to_sparse_semi_structured`` will use)."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def _eligible(module: nn.Module, dtype: torch.dtype, backend: type) -> str | None:
    """None if the layer's weight can go to the sparse kernel, else why not."""
    if not isinstance(module, nn.Linear):
        return "not a linear layer (PyTorch's 2:4 kernels cover matrix multiplies only)"
    w = module.weight
    if nm_violations(w, 2, 4):
        return "weight is not 2:4 sparse"
    c = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if c is None:
        return f"{dtype} not supported by {backend.__name__}"
    rows, cols = w.shape
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows or cols < c.sparse_min_cols or cols % c.sparse_min_cols:
        return f"shape {rows}x{cols} is not a multiple of ({c.sparse_min_rows}, {c.sparse_min_cols})"
    return None


def _cast_inputs(x: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    if isinstance(x, dict):
        return {k: _cast_inputs(v, dtype, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_inputs(v, dtype, device) for v in x)
    return x


@torch.no_grad()
def measure_2to4_latency(model: nn.Module, example_inputs: Any, repeats: int = 50, warmup: int = 10,
                         dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Latency of ``model`` with dense weights vs its 2:4 linear weights on sparse tensor cores (CUDA events; dense
    and sparse timed alternately, medians). The model is copied; the original is untouched.

    Returns ``{"measured": False, "reason": ...}`` where it cannot be done (no suitable GPU, no eligible layer, or
    the sparse outputs do not match the dense ones).

    Example:
        >>> measure_2to4_latency(model, torch.randn(64, 768))  # {'measured': True, 'speedup': 1.3, ...}
    """
    ok, why = semi_structured_support()
    if not ok:
        return {"measured": False, "reason": why}
    from torch.sparse import SparseSemiStructuredTensor

    backend = _backend()
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend is torch.sparse.SparseSemiStructuredTensorCUTLASS
    try:
        return _measure(model, example_inputs, repeats, warmup, dtype, backend, why)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced


def _measure(model: nn.Module, example_inputs: Any, repeats: int, warmup: int, dtype: torch.dtype, backend: type,
             gpu: str) -> dict[str, Any]:
    from torch.sparse import to_sparse_semi_structured

    device = torch.device("cuda")
    why = gpu
    dense = copy.deepcopy(model).eval()
    fold_masks(dense)
    dense = dense.to(device=device, dtype=dtype)
    sparse = copy.deepcopy(dense)
    converted, skipped = [], {}
    for name, m in sparse.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not (m.weight == 0).any():
            continue
        why_not = _eligible(m, dtype, backend)
        if why_not:
            skipped[name] = why_not
            continue
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach().contiguous()), requires_grad=False)
            converted.append(name)
        except (RuntimeError, ValueError) as e:  # a kernel/shape limit this torch build enforces
            skipped[name] = f"to_sparse_semi_structured failed: {e}"
    out: dict[str, Any] = {"device": why, "dtype": str(dtype).removeprefix("torch."), "backend": backend.BACKEND,
                           "converted": converted, "skipped": skipped}
    if not converted:
        return {**out, "measured": False,
                "reason": "no 2:4 linear layer fits the sparse kernels (see 'skipped'); no speed-up is claimed"}
    x = _cast_inputs(example_inputs, dtype, device)
    try:
        ref, got = call_model(dense, x), call_model(sparse, x)
    except (RuntimeError, NotImplementedError) as e:
        return {**out, "measured": False, "reason": f"the 2:4 model failed to run: {e}"}
    err = float((ref.float() - got.float()).abs().max())
    scale = float(ref.float().abs().max()) or 1.0
    out["max_abs_diff"] = err
    if err > 2e-2 * scale:
        return {**out, "measured": False, "reason": f"2:4 outputs differ from dense by {err:.3g}; not timed"}
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(warmup + repeats):
        for key, net in (("dense", dense), ("sparse", sparse)):  # alternate: both see the same clocks and heat
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call_model(net, x)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times[key].append(start.elapsed_time(end))
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    log.info("2:4 latency on %s (%s): dense %.3f ms, 2:4 %.3f ms (x%.2f), %d linear layers converted", why,
             out["dtype"], d, s, d / s, len(converted))
    return {**out, "measured": True, "dense_ms": d, "sparse_ms": s, "speedup": d / s, "repeats": repeats}
