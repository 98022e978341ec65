"""The structure of a decoder-only language model as :mod:`prunekit.pruning.llm.sparse` sees it: the transformers
model inside a wrapper, its list of decoder blocks and the linear layers (``nn.Linear``, GPT-2 ``Conv1D``) inside
them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError, compile_patterns
from prunekit.pruning.unstructured.layers import LayerSelection, execution_order, is_transposed

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` in ``model`` (itself, or the one inside prunekit's ``HFModel``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        raise ConfigError("decoder sparsity needs the transformers package: pip install 'prunekit[hf]'") from None
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise PruningError(f"{type(model).__name__} is not (and does not hold) a transformers model: decoder sparsity "
                       "runs on Hugging Face causal LMs (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, ...)")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name (in ``model``) and the ``ModuleList`` of the decoder blocks: a known attribute path of the
    transformers model (``model.layers``, ``transformer.h``, ...), else its longest list of same-typed modules that
    hold linear layers."""
    hf = transformers_model(model)
    prefix = next(n for n, m in model.named_modules() if m is hf)
    for path in BLOCK_LISTS:
        obj: Any = hf
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) and _linears(obj[0]):
            return ".".join(p for p in (prefix, path) if p), obj
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in hf.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1 and _linears(m[0])
                and (best is None or len(m) > len(best[1]))):
            best = (name, m)
    if best is None:
        raise PruningError(f"{type(hf).__name__}: found no list of decoder blocks (tried {', '.join(BLOCK_LISTS)})")
    return ".".join(p for p in (prefix, best[0]) if p), best[1]


def _linears(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if is_gemm(m)}


def is_gemm(m: nn.Module) -> bool:
    """nn.Linear or transformers' ``Conv1D`` (GPT-2: the same GEMM with the weight stored ``(in, out)``)."""
    return isinstance(m, nn.Linear) or (is_transposed(m) and isinstance(m._parameters.get("weight"), torch.Tensor))


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks, by qualified name in ``model``, in block order."""
    prefix, blocks = decoder_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in _linears(b).items()}


def select_decoder_layers(model: nn.Module, only: Iterable[str] = (), ignore: Iterable[str] = (),
                          example_inputs: Any = None) -> LayerSelection:
    """The ``LayerSelection`` of the ``wanda``/``sparsegpt`` sparsify methods: the linear layers inside the decoder
    blocks that match an ``only`` regex (all when empty) and no ``ignore`` regex; every other linear layer is listed
    as skipped. With ``example_inputs`` the layers' per-sample MACs are traced too."""
    only_re, ignore_re = compile_patterns(only, "--only"), compile_patterns(ignore, "--ignore")
    inside = decoder_linears(model)
    for pat in only_re:
        if not any(pat.search(n) for n in inside):
            raise ConfigError(f"--only {pat.pattern!r} matches no linear layer of the decoder blocks; they are: "
                              f"{', '.join(list(inside)[:12])}{' ...' if len(inside) > 12 else ''}")
    layers: dict[str, nn.Module] = {}
    skipped = {n: "outside the decoder blocks: embeddings and the LM head stay dense (Wanda / SparseGPT practice)"
               for n, m in model.named_modules() if is_gemm(m) and n not in inside}
    for n, m in inside.items():
        if only_re and not any(p.search(n) for p in only_re):
            skipped[n] = "not matched by --only"
        elif any(p.search(n) for p in ignore_re):
            skipped[n] = "matched by --ignore"
        else:
            layers[n] = m
    if not layers:
        raise PruningError("no decoder layer left to sparsify after --only/--ignore")
    order, macs = list(layers), {}
    if example_inputs is not None:
        order, macs = execution_order(model, example_inputs, layers)
        for n in macs:  # execution_order counts fan-in as weight[0].numel(), the output size for a Conv1D
            m = layers[n]
            if is_transposed(m):
                macs[n] = macs[n] * m.weight.shape[0] // m.weight.shape[1]
    return LayerSelection(layers=layers, skipped=skipped, order=order, macs=macs)

