"""The decoder families width pruning knows: where their MLP and attention projections are, and how a config says it.

A family maps a transformers ``model_type`` to the modules of each decoder layer and to the config fields a pruned
model must carry so that plain ``AutoModelForCausalLM.from_pretrained`` rebuilds it:

- ``llama`` (LlamaForCausalLM), ``mistral`` (MistralForCausalLM): SwiGLU ``mlp.{gate,up,down}_proj``; attention
  ``self_attn.{q,k,v,o}_proj`` with GQA. A Llama config can switch biases on for all MLPs (``mlp_bias``) or all
  attention projections (``attention_bias``); width pruning does so only when asked (``add_bias=True``), since it
  changes the architecture runtimes expect.
- ``qwen2``: the same layout; the MLP and ``o_proj`` have no bias and the config cannot add one (nor can
  Mistral's).
- ``gpt2``: ``mlp.c_fc`` -> GELU -> ``mlp.c_proj`` (``Conv1D``, weight stored ``(in, out)``), width ``n_inner``.
  Its attention derives ``head_dim = n_embd / n_head``, so removing heads cannot be expressed in its config:
  refused.

Weights are handled in ``nn.Linear`` layout ``(out, in)`` throughout (:func:`weight_oi`); :func:`keep_out` and
:func:`keep_in` slice a Linear or Conv1D in place.

Example:
    >>> fam = get_family(model)               # e.g. family "llama"
    >>> blocks = fam.blocks(model)            # one Block per decoder layer
    >>> blocks[0].producers, blocks[0].consumer   # [gate_proj, up_proj], down_proj
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.errors import PruningError


@dataclasses.dataclass
class Block:
    """One decoder layer's prunable parts (module names are relative to the causal LM)."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    producers: list[str]  # MLP input projections whose output rows are the channels (gate, up / c_fc)
    consumer: str  # MLP down projection whose input columns are the channels
    attn: dict[str, str] | None  # {"q", "k", "v", "o"} -> name, or None where heads cannot be pruned


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path of the ModuleList of decoder layers
    mlp: tuple[tuple[str, ...], str]  # (producer names, consumer name) inside a layer
    attn: dict[str, str] | None  # q/k/v/o names inside a layer
    set_width: Callable[[Any, int], None]
    mlp_bias: str | None  # config key that switches on the MLP biases (down_proj's included), None: cannot
    attn_bias: str | None  # config key that switches on the q/k/v/o biases, None: cannot

    def blocks(self, model: nn.Module) -> list[Block]:
        layers = _get(model, self.layers_path)
        out = []
        for i in range(len(layers)):
            p = f"{self.layers_path}.{i}"
            attn = {k: f"{p}.{v}" for k, v in self.attn.items()} if self.attn else None
            out.append(Block(i, p, [f"{p}.{n}" for n in self.mlp[0]], f"{p}.{self.mlp[1]}", attn))
        return out


FAMILIES: dict[str, Family] = {}


def register_family(f: Family) -> Family:
    for t in f.model_types:
        FAMILIES[t] = f
    return f


def list_families() -> list[str]:
    return sorted(FAMILIES)


def get_family(model: nn.Module) -> Family:
    """The family of a transformers causal LM, by ``config.model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FAMILIES:
        raise PruningError(f"LLM width pruning: model_type {mt!r} is not supported; supported: "
                           f"{', '.join(list_families())}")
    return FAMILIES[mt]


def _set_inter(config: Any, n: int) -> None:
    config.intermediate_size = n


def _set_n_inner(config: Any, n: int) -> None:
    config.n_inner = n


_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
register_family(Family("llama", ("llama",), "model.layers", (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
                       _LLAMA_ATTN, _set_inter, "mlp_bias", "attention_bias"))
register_family(Family("mistral", ("mistral",), "model.layers", (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
                       _LLAMA_ATTN, _set_inter, None, None))
register_family(Family("qwen2", ("qwen2",), "model.layers", (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
                       _LLAMA_ATTN, _set_inter, None, None))
register_family(Family("gpt2", ("gpt2",), "transformer.h", (("mlp.c_fc",), "mlp.c_proj"), None, _set_n_inner,
                       None, None))  # c_proj has a bias already


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def weight_oi(m: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a transposed view for transformers' Conv1D)."""
    return m.weight.T if is_conv1d(m) else m.weight


def out_features(m: nn.Module) -> int:
    return weight_oi(m).shape[0]


def in_features(m: nn.Module) -> int:
    return weight_oi(m).shape[1]


@torch.no_grad()
def keep_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output features ``idx`` (rows of the (out, in) weight, and the bias)."""
    idx = idx.to(m.weight.device)
    w = m.weight[:, idx] if is_conv1d(m) else m.weight[idx]
    m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias[idx].clone(), requires_grad=m.bias.requires_grad)
    if is_conv1d(m):
        m.nf = len(idx)
    else:
        m.out_features = len(idx)


@torch.no_grad()
def keep_in(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep input features ``idx`` (columns of the (out, in) weight)."""
    idx = idx.to(m.weight.device)
    w = m.weight[idx] if is_conv1d(m) else m.weight[:, idx]
    m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if not is_conv1d(m):
        m.in_features = len(idx)


@torch.no_grad()
def set_weight_oi(m: nn.Module, w_oi: torch.Tensor) -> None:
    m.weight.copy_((w_oi.T if is_conv1d(m) else w_oi).to(m.weight.dtype))


@torch.no_grad()
def ensure_bias(m: nn.Module) -> nn.Parameter:
    """``m.bias``, created as zeros when missing (the config must say so too, see ``Family.mlp_bias``)."""
    if m.bias is None:
        n = out_features(m)
        m.bias = nn.Parameter(torch.zeros(n, dtype=m.weight.dtype, device=m.weight.device),
                              requires_grad=m.weight.requires_grad)
    return m.bias


def head_layout(config: Any) -> tuple[int, int, int]:
    """(query heads, key-value heads, head_dim) of a Llama-style config."""
    nq = int(config.num_attention_heads)
    nkv = int(getattr(config, "num_key_value_heads", None) or nq)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // nq)
    return nq, nkv, hd
