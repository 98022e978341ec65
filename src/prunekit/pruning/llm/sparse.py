"""Unstructured and N:M sparsity for decoder-only language models, one decoder block at a time.

Three criteria, each a small function of one weight ``W`` seen as ``(out, in)`` (a GPT-2 ``Conv1D`` stores it
transposed; ``gemm_weight`` hides that):

=============  ==========================================================  =====================================
method         what is pruned                                              exact count
=============  ==========================================================  =====================================
``magnitude``  lowest ``|W_ij|``; no data                                  ``round(s * numel)`` per layer
``wanda``      lowest ``|W_ij| * ||X_j||_2`` compared within each output   ``round(s * in)`` per output row
               row (Sun et al. 2023, "A Simple and Effective Pruning
               Approach for Large Language Models"); weights unchanged
``sparsegpt``  OBS column by column with the Cholesky factor of ``H^-1``,  ``round(s * numel)`` per layer (the
               ``H = X^T X + damp * mean(diag) * I``; the mask is chosen    mask is adaptive across rows)
               per block of columns by ``w^2 / [H^-1]_jj^2`` and the kept
               weights are updated to absorb the error (Frantar & Alistarh
               2023, "SparseGPT: Massive Language Models Can Be Accurately
               Pruned in One-Shot")
=============  ==========================================================  =====================================

With ``nm=(N, M)`` every method keeps exactly N of every M consecutive weights along the input dimension instead
(2:4 for sparse tensor cores).

``prune_decoder`` runs the calibration tokens through the decoder blocks in order: the inputs of block ``b`` are
captured once, forward hooks on the block's linear layers accumulate what the criterion needs (``sum_t x_t^2`` per
input for Wanda, ``sum_t x_t x_t^T`` for SparseGPT), the block is pruned, and the PRUNED block's outputs become the
inputs of block ``b + 1``. Memory stays at one block's activations for the calibration set plus one Hessian per
linear layer of that block, and each block is pruned for the inputs it will really see, as in both papers.

Masks are prunekit's ``weight_mask`` buffers (``prunekit.pruning.unstructured.masks``), so the result saves,
reloads and trains like any sparsified model. Embeddings and the LM head stay dense.

Example:
    >>> result = prune_decoder(model, "sparsegpt", sparsity=0.5, calib_data=[ids])   # ids: (B, T) token ids
    >>> result = prune_decoder(model, "wanda", nm=(2, 4), calib_data=batches)
    >>> result.sparsity, result.layers["model.layers.0.mlp.down_proj"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError

# the criteria and the decoder structure live in their own modules; their names stay importable from here
from prunekit.pruning.llm.decoder import (  # noqa: F401
    BLOCK_LISTS,
    _linears,
    decoder_blocks,
    decoder_linears,
    is_gemm,
    select_decoder_layers,
    transformers_model,
)
from prunekit.pruning.llm.sparse_criteria import (  # noqa: F401
    _inverse_cholesky,
    magnitude_mask,
    row_lowest,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from prunekit.pruning.transaction import transactional
from prunekit.pruning.unstructured.layers import gemm_weight, is_transposed
from prunekit.pruning.unstructured.masks import get_mask, set_mask

log = logging.getLogger(__name__)

LLM_METHODS = ("magnitude", "wanda", "sparsegpt")
NEEDS_DATA = ("wanda", "sparsegpt")


@dataclass
class DecoderSparsity:
    """What ``prune_decoder`` did: per-layer sparsity (fraction of exact zeros), overall sparsity of the pruned
    layers, the pattern, and how much calibration it saw."""

    method: str
    target: float
    nm: tuple[int, int] | None
    layers: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _zeros: int = 0
    _numel: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros over all pruned layers."""
        return self._zeros / max(1, self._numel)


# ----------------------------------------------------------------------------------------------- checks
def check_target(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The sparsity a layer ends with; bad combinations are ``ConfigError``s naming the option."""
    if nm is not None:
        if sparsity is not None:
            raise ConfigError(f"give either sparsity ({sparsity}) or nm ({nm[0]}:{nm[1]}), not both: an N:M pattern "
                              "sets the sparsity (1 - N/M)")
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ConfigError(f"nm {n}:{m}: need integers 0 < N < M (keep N of every M weights), e.g. 2:4")
        return 1 - n / m
    if sparsity is None:
        raise ConfigError("give a sparsity in [0, 1) (e.g. 0.5) or an N:M pattern (e.g. nm=(2, 4))")
    if not 0 <= float(sparsity) < 1:
        raise ConfigError(f"sparsity {sparsity} must be in [0, 1): the fraction of each layer's weights set to zero")
    return float(sparsity)


def check_method(method: str) -> str:
    if method not in LLM_METHODS:
        raise ConfigError(f"decoder sparsity: unknown method {method!r}; valid: {', '.join(LLM_METHODS)}")
    return method


# ----------------------------------------------------------------------------------------------- calibration
class _Stop(Exception):
    pass


def _batches(calib_data: Iterable, max_batches: int | None) -> Iterable[Any]:
    for i, batch in enumerate(calib_data):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(batch, (tuple, list)):  # (ids, labels) or (ids,)
            batch = batch[0]
        if not isinstance(batch, (torch.Tensor, dict)):
            raise PruningError(f"calibration batch {i} is a {type(batch).__name__}: expected token ids (B, T), a "
                               "dict with 'input_ids', or an (ids, labels) pair")
        yield batch


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_data: Iterable, device: torch.device,
                         max_batches: int | None = None) -> tuple[list[tuple[tuple, dict]], int]:
    """Run each calibration batch through the embeddings up to the first decoder block and keep what that block
    is called with (positional args, keyword args: attention mask, rotary position embeddings, ...). Returns them
    and the number of tokens."""
    hf = transformers_model(model)
    _, blocks = decoder_blocks(model)
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    tokens = 0
    try:
        for batch in _batches(calib_data, max_batches):
            inputs = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) \
                else {"input_ids": batch.to(device)}
            ids = inputs.get("input_ids")
            tokens += int(ids.numel()) if ids is not None else 0
            try:
                hf(**inputs, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise PruningError("decoder sparsity got no calibration batch: pass calib_data (token-id batches)")
    return captured, tokens


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args[1:], **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Collector:
    """Forward hook accumulating, per linear layer, ``sum_t x_t^2`` (Wanda) or ``sum_t x_t x_t^T`` (SparseGPT)."""

    def __init__(self, full: bool):
        self.full = full
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def hook(self, name: str):
        def fn(module: nn.Module, args: tuple, out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            s = x.T @ x if self.full else x.pow(2).sum(0)
            self.stats[name] = self.stats[name] + s if name in self.stats else s
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return fn


def _block_stats(method: str, block: nn.Module, layers: dict[str, nn.Module], hidden: list[torch.Tensor],
                 captured: list[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
    """One pass of the calibration set through ``block`` with hooks on ``layers``: their input statistics."""
    if not layers:
        return {}
    col = _Collector(full=method == "sparsegpt")
    handles = [m.register_forward_hook(col.hook(n)) for n, m in layers.items()]
    try:
        for h, (args, kwargs) in zip(hidden, captured):
            _run_block(block, h, args, kwargs)
    finally:
        for hd in handles:
            hd.remove()
    unseen = [n for n in layers if n not in col.stats]
    if unseen:
        raise PruningError(f"{method}: layers {', '.join(unseen)} never ran on the calibration data, so they have no "
                           "input statistics; leave them out (layers=/--ignore)")
    return col.stats


def _input_groups(block: nn.Module, layers: dict[str, nn.Module], hidden: torch.Tensor,
                  call: tuple[tuple, dict]) -> list[dict[str, nn.Module]]:
    """``layers`` in execution order, grouped by shared input (q/k/v; o; gate/up; down for a Llama block)."""
    # the inputs themselves are kept (one batch): an id() of a freed tensor can be reused by the next group's input
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen.append((n, a[0]))) for n, m in layers.items()]
    try:
        _run_block(block, hidden, *call)
    finally:
        for hd in handles:
            hd.remove()
    groups: list[dict[str, nn.Module]] = []
    last = None
    for n, key in seen:
        if any(n in g for g in groups):
            continue
        if key is not last or not groups:
            groups.append({})
        groups[-1][n] = layers[n]
        last = key
    missing = {n: m for n, m in layers.items() if not any(n in g for g in groups)}
    return groups + ([missing] if missing else [])


# ----------------------------------------------------------------------------------------------- driver
def _prune_layer(method: str, module: nn.Module, stat: torch.Tensor | None, sparsity: float,
                 nm: tuple[int, int] | None, blocksize: int, damp: float) -> torch.Tensor:
    """Prune one layer in place (weights zeroed, SparseGPT: updated) and return its keep-mask in the weight's own
    layout."""
    w = gemm_weight(module).detach()  # (out, in) view
    if method == "magnitude":
        keep = magnitude_mask(w, sparsity, nm)
    elif method == "wanda":
        keep = wanda_mask(w, stat, sparsity, nm)
    else:
        new, keep = sparsegpt_prune(w, stat, sparsity, nm, blocksize, damp)
        with torch.no_grad():
            w.copy_(new.to(w.dtype))  # w is a view of module.weight
    return keep.t() if is_transposed(module) else keep


@torch.no_grad()
@transactional("prune_decoder()")
def prune_decoder(model: nn.Module, method: str, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                  calib_data: Iterable | None = None, layers: dict[str, nn.Module] | None = None,
                  max_batches: int | None = None, blocksize: int = 128, damp: float = 0.01,
                  sequential: bool = False, device: str | torch.device | None = None) -> DecoderSparsity:
    """Sparsify the linear layers of a decoder-only LM block by block (see the module docstring); masks attached.

    Args:
        model: a transformers causal LM, or prunekit's ``HFModel`` around one; changed in place.
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        sparsity: fraction of each layer's weights zeroed, in [0, 1); or give ``nm`` instead.
        nm: ``(N, M)``: keep N of every M weights along the input dimension (e.g. ``(2, 4)``).
        calib_data: batches of token ids ``(B, T)`` (or dicts with ``input_ids``, or ``(ids, labels)`` pairs);
            needed by ``wanda`` and ``sparsegpt``.
        layers: the layers to prune, by qualified name (default: every linear layer in the decoder blocks);
            a layer outside the blocks is an error.
        max_batches: use at most this many calibration batches.
        blocksize, damp: SparseGPT's column block and Hessian damping (fraction of the mean diagonal).
        sequential: within a block, prune the layers in groups of shared input (q/k/v, o, gate/up, down) and
            calibrate each group on the outputs of the groups already pruned (SparseGPT's "true sequential";
            one calibration pass per group instead of one per block).

    Example:
        >>> r = prune_decoder(model, "wanda", sparsity=0.5, calib_data=loader, max_batches=64)
        >>> r.sparsity
        0.5
    """
    t0 = time.perf_counter()
    method, target = check_method(method), check_target(sparsity, nm)
    prefix, blocks, chosen, skipped = _choose_layers(model, method, layers, nm)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    result = DecoderSparsity(method=method, target=target, nm=nm, layers={}, skipped=skipped)
    pattern = f"{nm[0]}:{nm[1]}" if nm else f"{target:.4g}"
    was_training = model.training
    model.eval()
    try:
        captured, result.tokens = [], 0
        if method in NEEDS_DATA:
            if calib_data is None:
                raise PruningError(f"method {method!r} needs calibration data: pass calib_data (token-id batches)")
            captured, result.tokens = capture_block_inputs(model, calib_data, dev, max_batches)
        hidden = [args[0] for args, _ in captured]
        for b, block in enumerate(blocks):
            tb = time.perf_counter()
            here = {n: m for n, m in chosen.items() if n.startswith(f"{prefix}.{b}.")}
            groups = _input_groups(block, here, hidden[0], captured[0]) if sequential and captured else [here]
            for group in groups:  # sequential: pruned groups feed the next ones of the same block
                _prune_group(method, block, group, hidden, captured, result, blocksize, damp)
            if captured and b + 1 < len(blocks):  # the next block sees what the pruned block outputs
                hidden = [_run_block(block, h, args, kwargs) for h, (args, kwargs) in zip(hidden, captured)]
            if here:
                log.info("%s %s: block %d/%d pruned (%d layers, sparsity %.4f .. %.4f) in %.1f s", method, pattern,
                         b + 1, len(blocks), len(here), min(result.layers[n] for n in here),
                         max(result.layers[n] for n in here), time.perf_counter() - tb)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    log.info("%s %s: %d layers pruned, sparsity %.4f, %d calibration tokens, %.1f s", method, pattern,
             len(result.layers), result.sparsity, result.tokens, result.seconds)
    return result


def _choose_layers(model: nn.Module, method: str, layers: dict[str, nn.Module] | None,
                   nm: tuple[int, int] | None) -> tuple[str, nn.ModuleList, dict[str, nn.Module], dict[str, str]]:
    """(blocks' prefix, blocks, the dense layers to prune, layers left dense -> why); refuses layers outside the
    blocks and layers already sparse."""
    prefix, blocks = decoder_blocks(model)
    inside = decoder_linears(model)
    chosen = inside if layers is None else dict(layers)
    outside = [n for n in chosen if n not in inside]
    if outside:
        raise PruningError(f"decoder sparsity prunes the linear layers inside the decoder blocks ({prefix}.N); these "
                           f"are not: {', '.join(outside[:6])}")
    if not chosen:
        raise PruningError("decoder sparsity: no layer to prune")
    skipped: dict[str, str] = {}
    if nm is not None:
        for n in list(chosen):
            if gemm_weight(chosen[n]).shape[1] % nm[1]:
                skipped[n] = f"input size {gemm_weight(chosen[n]).shape[1]} is not a multiple of {nm[1]}: left dense"
                del chosen[n]
        if skipped:
            log.warning("decoder sparsity %d:%d: %d layers left dense: %s", *nm, len(skipped), ", ".join(skipped))
    sparse = [n for n, m in chosen.items() if get_mask(m) is not None and not bool(get_mask(m).all())]
    if sparse:
        raise PruningError(f"layers {', '.join(sparse[:4])} are already sparse (they have a weight_mask): {method} "
                           "prunes dense layers one-shot; start from the dense model")
    return prefix, blocks, chosen, skipped


def _prune_group(method: str, block: nn.Module, group: dict[str, nn.Module], hidden: list[torch.Tensor],
                 captured: list, result: DecoderSparsity, blocksize: int, damp: float) -> None:
    """Calibrate and prune the layers of ``group`` (of one block), masks attached, counts added to ``result``."""
    stats = _block_stats(method, block, group, hidden, captured) if method in NEEDS_DATA else {}
    for n, m in group.items():
        keep = _prune_layer(method, m, stats.get(n), result.target, result.nm, blocksize, damp)
        set_mask(m, keep, n)
        result.masks[n] = keep
        zeros = int((m.weight == 0).sum())
        result.layers[n] = zeros / m.weight.numel()
        result._zeros += zeros
        result._numel += m.weight.numel()
    stats.clear()
