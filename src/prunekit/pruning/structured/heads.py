"""Multi-head attention modules: which projections carry heads, and how to update a module after head pruning.

Known layouts (``kind``):
    ``fused``  one ``qkv`` Linear with ``3 * num_heads * head_dim`` outputs (timm ViT/DeiT/Swin, torchvision Swin)
    ``bert``   ``query``/``key``/``value`` Linears, ``num_attention_heads``/``attention_head_size`` (HF BERT, ViT)
    ``llama``  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``head_dim`` (HF LLaMA-style; rotary, maybe GQA)
    ``torch``  ``nn.MultiheadAttention`` (torchvision ViT): torch-pruning prunes its embedding dim with the
               residual stream; head removal is not supported there.
    ``other``  any other module with a head-count attribute (``num_heads``, ``n_heads``, ...) and 3+ Linear
               children: every Linear child but the last (the output projection) is treated as head-carrying,
               so it is left alone; head removal is refused.
The projections' output channels are never pruned piecemeal: either whole heads go (``heads=True``) or the
attention internals are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from prunekit.errors import PruningError


@dataclass
class Attention:
    name: str
    module: nn.Module
    kind: str
    projections: list[str] = field(default_factory=list)  # names of the head-carrying Linears (output side)
    num_heads: int = 0
    head_dim: int = 0
    num_kv_heads: int = 0
    bias_per_head: bool = False  # a relative-position bias table with one column per head (Swin)

    def supports_head_pruning(self) -> str | None:
        """``None`` when whole heads can be removed, else the reason they cannot."""
        if self.bias_per_head and not callable(getattr(self.module, "remove_heads", None)):
            return "its relative-position bias table has one column per head, which torch-pruning does not prune"
        if self.kind == "other":
            return f"unknown attention layout {type(self.module).__name__}"
        if self.kind == "torch":
            return "nn.MultiheadAttention keeps its heads (torch-pruning prunes its embedding dim only)"
        if self.kind == "llama":
            return ("rotary (LLaMA-style) attention: torch-pruning 1.6 cannot trace its head groups; "
                    "prune its MLPs (preset='mlp-only') without heads=True")
        return None

    def set_heads(self, num_heads: int, removed: list[int] | None = None) -> None:
        """Update the module's head-count attributes after ``self.num_heads - num_heads`` heads (``removed``, when
        known) were removed. A module with a ``remove_heads(removed)`` method (prunekit's torchvision Swin forms)
        also prunes its per-head tables there."""
        m = self.module
        if removed is not None and callable(getattr(m, "remove_heads", None)):
            m.remove_heads(list(removed))
        if self.kind == "fused":
            m.num_heads = num_heads
            if hasattr(m, "attn_dim"):
                m.attn_dim = num_heads * self.head_dim
        elif self.kind == "bert":
            m.num_attention_heads = num_heads
            m.all_head_size = num_heads * self.head_dim
        self.num_heads = num_heads


def _linear(m: nn.Module, attr: str) -> nn.Linear | None:
    sub = getattr(m, attr, None)
    return sub if isinstance(sub, nn.Linear) else None


def find_attention(model: nn.Module) -> list[Attention]:
    """Every multi-head attention module of a known layout, in module order."""
    found: list[Attention] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            found.append(Attention(name, m, "torch", [], m.num_heads, m.head_dim, m.num_heads))
        elif _linear(m, "qkv") is not None and isinstance(getattr(m, "num_heads", None), int):
            heads = m.num_heads
            hd = getattr(m, "head_dim", None) or m.qkv.out_features // (3 * heads)
            if m.qkv.out_features != 3 * heads * hd:
                raise PruningError(f"attention {name!r}: qkv has {m.qkv.out_features} outputs, expected "
                                   f"3 * {heads} heads * {hd} dims")
            found.append(Attention(name, m, "fused", [prefix + "qkv"], heads, hd, heads,
                                   bias_per_head=hasattr(m, "relative_position_bias_table")))
        elif all(_linear(m, a) is not None for a in ("query", "key", "value")) and hasattr(m, "num_attention_heads"):
            heads = int(m.num_attention_heads)
            hd = int(getattr(m, "attention_head_size", m.query.out_features // heads))
            found.append(Attention(name, m, "bert", [prefix + a for a in ("query", "key", "value")], heads, hd, heads))
        elif all(_linear(m, a) is not None for a in ("q_proj", "k_proj", "v_proj")) and hasattr(m, "head_dim"):
            hd = int(m.head_dim)
            found.append(Attention(name, m, "llama", [prefix + a for a in ("q_proj", "k_proj", "v_proj")],
                                   m.q_proj.out_features // hd, hd, m.k_proj.out_features // hd))
        else:
            heads = next((getattr(m, a) for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)), None)
            linears = [n for n, c in m.named_children() if isinstance(c, nn.Linear)]
            if heads and len(linears) >= 3:
                found.append(Attention(name, m, "other", [prefix + n for n in linears[:-1]], heads, 0, heads))
    return found


HEAD_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads")


def sync_attributes(model: nn.Module) -> None:
    """Update attributes that a model reads in ``forward`` and torch-pruning does not know about."""
    for m in model.modules():
        # torchvision ViT reshapes the patch embedding with self.hidden_dim
        if type(m).__name__ == "VisionTransformer" and isinstance(getattr(m, "conv_proj", None), nn.Conv2d):
            m.hidden_dim = m.conv_proj.out_channels
