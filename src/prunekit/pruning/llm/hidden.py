"""Hidden-size pruning of Llama-style decoders: channels of the residual stream, across every RMSNorm, the embeddings
and the LM head (the "embedding" axis of Minitron, arXiv 2407.14679).

A hidden channel ``d`` lives in: column ``d`` of ``embed_tokens``; element ``d`` of every RMSNorm weight
(``input_layernorm``, ``post_attention_layernorm`` of each layer, the final ``norm``); input column ``d`` of
``q/k/v_proj`` and ``gate/up_proj``; output row ``d`` (and bias) of ``o_proj`` and ``down_proj``; input column ``d``
of ``lm_head`` (the same tensor as the embedding when they are tied). All of them lose the same channels; the config's
``hidden_size`` is updated and ``head_dim`` written explicitly (it no longer follows from ``hidden_size / heads``), so
plain ``AutoModelForCausalLM.from_pretrained`` rebuilds the pruned model.

Criteria (scored on calibration token ids, every norm of the model together):

- ``activation`` (default): mean square of each channel at the output of every RMSNorm, summed over the norms: what
  each channel feeds into attention, the MLPs and the LM head (Minitron's activation-based embedding importance,
  squared: the stream is not centred, so a channel's mean matters as much as its variance);
- ``magnitude``: squared norm of all the weights that read or write the channel;
- ``random``.

RMS correction (``rms_correction=True``, default): an RMSNorm divides by the root mean square over the channels it
sees; with fewer (and the strongest kept) that root mean square changes, which rescales every normed activation.
Each norm's weight is multiplied by ``sqrt(E[mean_K x^2] / E[mean_all x^2])``, measured at its input on the
calibration data, so its outputs keep their calibration scale.

Example:
    >>> report = prune_hidden(model, calib_ids, keep=0.75)   # hidden 256 -> 192 everywhere
    >>> save_pruned(model, "out/", report)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.transaction import transactional

from .arch import get_family, head_layout, keep_in, keep_out, weight_oi
from .stats import calibration_batches

log = logging.getLogger(__name__)

CRITERIA = ("activation", "magnitude", "random")


def _norms(lm: nn.Module) -> dict[str, nn.Module]:
    """Every RMSNorm on the residual stream, by name (the layers' two and the final one)."""
    out = {}
    for i, layer in enumerate(lm.model.layers):
        out[f"model.layers.{i}.input_layernorm"] = layer.input_layernorm
        out[f"model.layers.{i}.post_attention_layernorm"] = layer.post_attention_layernorm
    out["model.norm"] = lm.model.norm
    return out


def _readers_writers(lm: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Linear layers reading the stream (input columns) and writing it (output rows)."""
    readers, writers = [], []
    for layer in lm.model.layers:
        a, m = layer.self_attn, layer.mlp
        readers += [a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj]
        writers += [a.o_proj, m.down_proj]
    return readers, writers


@torch.no_grad()
def _norm_statistics(lm: nn.Module, norms: dict[str, nn.Module], batches: list[torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per norm: sum over calibration tokens of x^2 at its input and of y^2 at its output, per channel (float64),
    divided by the token count."""
    sq_in = {n: torch.zeros(m.weight.numel(), dtype=torch.float64) for n, m in norms.items()}
    sq_out = {n: torch.zeros_like(v) for n, v in sq_in.items()}
    tokens = {"n": 0}
    hooks = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            y = out.detach().double().reshape(-1, out.shape[-1])
            sq_in[name] += x.square().sum(0).cpu()
            sq_out[name] += y.square().sum(0).cpu()
        return fn

    for n, m in norms.items():
        hooks.append(m.register_forward_hook(hook(n)))
    was = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    try:
        for b in batches:
            lm(input_ids=b.to(device))
            tokens["n"] += b.numel()
    finally:
        for h in hooks:
            h.remove()
        lm.train(was)
    n = max(tokens["n"], 1)
    return {k: v / n for k, v in sq_in.items()}, {k: v / n for k, v in sq_out.items()}


def _scores(lm: nn.Module, criterion: str, sq_out: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    d = lm.config.hidden_size
    if criterion == "activation":
        return torch.stack(list(sq_out.values())).sum(0)
    if criterion == "magnitude":
        readers, writers = _readers_writers(lm)
        s = lm.model.embed_tokens.weight.detach().double().square().sum(0).cpu()
        for m in readers:
            s += weight_oi(m).detach().double().square().sum(0).cpu()
        for m in writers:
            s += weight_oi(m).detach().double().square().sum(1).cpu()
        return s
    return torch.rand(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
@transactional("prune_hidden()")
def prune_hidden(model: nn.Module, calib: torch.Tensor | list[torch.Tensor] | None = None, *, keep: float = 0.75,
                 criterion: str = "activation", rms_correction: bool = True, round_to: int = 1, seed: int = 0,
                 batch_size: int = 8) -> dict[str, Any]:
    """Prune the hidden size of a Llama / Mistral / Qwen2 causal LM in place (see the module docstring).

    Args:
        model: a transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (or ``hf:`` wrapper).
        calib: calibration token ids, ``(N, T)`` or a list of ``(B, T)`` batches; needed by ``activation`` and by
            ``rms_correction``.
        keep: fraction of hidden channels kept, in (0, 1).
        criterion: ``activation``, ``magnitude`` or ``random``.
        rms_correction: rescale every RMSNorm for the channels it no longer averages over.
        round_to: keep a multiple of this many channels.

    Returns:
        A report: hidden size before/after, criterion, per-norm RMS correction factors, parameters, seconds.
    """
    from .width import kept_count, unwrap

    t0 = time.perf_counter()
    lm = unwrap(model)
    fam = get_family(lm)
    if fam.attn is None:
        raise ConfigError(f"prune_hidden: model_type {lm.config.model_type!r} derives head_dim from the hidden size "
                          "(hidden = heads x head_dim), so the hidden size cannot shrink on its own; supported: "
                          "llama, mistral, qwen2")
    _check_args(criterion, keep, round_to)
    d = int(lm.config.hidden_size)
    k = kept_count(d, 1.0 - keep, round_to)  # the rule of the MLP widths
    if k >= d:
        raise ConfigError(f"prune_hidden: keep={keep} keeps all {d} hidden channels (round_to={round_to})")
    needs_data = criterion == "activation" or rms_correction
    if needs_data and calib is None:
        raise PruningError(f"prune_hidden: criterion={criterion!r} / rms_correction={rms_correction} need "
                           "calibration token ids (calib=...); pass them, or criterion='magnitude' with "
                           "rms_correction=False")
    norms = _norms(lm)
    sq_in = sq_out = {}
    if needs_data:
        sq_in, sq_out = _norm_statistics(lm, norms, calibration_batches(calib, batch_size))
    scores = _scores(lm, criterion, sq_out, seed)
    kept = scores.argsort(descending=True)[:k].sort().values

    corrections, tied = _apply(lm, norms, kept, sq_in if rms_correction else None)
    log.info("hidden size %d -> %d (%s%s)", d, k, criterion, ", RMS corrected" if rms_correction else "")
    return {"hidden_size": [d, k], "criterion": criterion, "rms_correction": corrections, "tied_embeddings": tied,
            "kept": kept.tolist(), "params_after": sum(p.numel() for p in lm.parameters()),
            "seconds": round(time.perf_counter() - t0, 2)}


def _check_args(criterion: str, keep: float, round_to: int) -> None:
    if criterion not in CRITERIA:
        raise ConfigError(f"prune_hidden: criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    if not 0 < keep < 1:
        raise ConfigError(f"prune_hidden: keep={keep} must be in (0, 1)")
    if round_to < 1:
        raise ConfigError(f"prune_hidden: round_to={round_to} must be >= 1")


def _apply(lm: nn.Module, norms: dict[str, nn.Module], kept: torch.Tensor,
           sq_in: dict[str, torch.Tensor] | None) -> tuple[dict[str, float], bool]:
    """Keep the hidden channels ``kept`` in every norm, reader, writer, the embedding and the head; RMSNorm weights
    rescaled when ``sq_in`` (the norms' mean squared inputs) is given. (RMS correction factors, tied embeddings)."""
    _, _, hd = head_layout(lm.config)
    lm.config.head_dim = hd  # explicit: it no longer equals hidden_size / heads
    corrections = {}
    for name, m in norms.items():
        w = m.weight.detach()[kept.to(m.weight.device)].clone()
        if sq_in is not None:
            full, part = float(sq_in[name].mean()), float(sq_in[name][kept].mean())
            f = math.sqrt(part / full) if full > 0 else 1.0
            w *= f
            corrections[name] = round(f, 6)
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    readers, writers = _readers_writers(lm)
    for m in readers:
        keep_in(m, kept)
    for m in writers:
        keep_out(m, kept)
    emb, head = lm.model.embed_tokens, lm.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.detach()[:, kept.to(emb.weight.device)].clone(),
                              requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = k = len(kept)
    if head is not None:
        if tied:
            head.weight = emb.weight
            head.in_features = k
        else:
            keep_in(head, kept)
    lm.config.hidden_size = k
    if lm.model.embed_tokens.weight.shape[1] != k:
        raise PruningError("prune_hidden: the embedding was not resized")
    return corrections, tied
