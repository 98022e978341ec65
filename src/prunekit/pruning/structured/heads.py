"""Multi-head attention modules: which projections carry heads, and how to update a module after head pruning.

Known layouts (``kind``):
    ``fused``  one ``qkv`` Linear with ``3 * num_heads * head_dim`` outputs (timm ViT/DeiT/Swin, torchvision Swin)
    ``bert``   ``query``/``key``/``value`` Linears, ``num_attention_heads``/``attention_head_size`` (HF BERT, ViT)
    ``llama``  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``head_dim`` (HF LLaMA-style; rotary, maybe GQA);
               without rotary embeddings nor GQA (HF ViT in transformers 5) it is handled as ``custom``
    ``torch``  ``nn.MultiheadAttention`` (torchvision ViT): torch-pruning prunes its embedding dim with the
               residual stream; head removal is not supported there.
    ``custom`` a class declared with ``register_attention`` (a user's own attention): its layout names the
               projections and the head-count attributes, so ``heads=True`` removes whole heads from it.
    ``other``  any other module with a head-count attribute (``num_heads``, ``n_heads``, ...) and 2+ Linear
               children: every Linear child but the last (the output projection) is treated as head-carrying,
               so it is left alone; head removal is refused until its layout is declared.
The projections' output channels are never pruned piecemeal: either whole heads go (``heads=True``) or the
attention internals are left untouched.

Example (a user's attention doing ``self.to_qkv(x).reshape(B, N, 3, self.heads, self.dim_head)``):
    >>> prunekit.register_attention(MyAttention, qkv="to_qkv", proj="to_out", num_heads_attr="heads",
    ...                             head_dim_attr="dim_head")
    >>> prunekit.prune(model, x, ratio=0.3, heads=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.families import sync_families


@dataclass(frozen=True)
class AttentionLayout:
    """Where a multi-head attention class keeps its heads.

    Args:
        qkv: the fused Linear whose outputs are ``(3, num_heads, head_dim)`` (q, k, v blocks, heads inside each),
            or the names of three Linears (q, k, v) whose outputs are ``(num_heads, head_dim)``.
        proj: the output projection Linear (reads ``num_heads * head_dim`` channels).
        num_heads_attr: the attribute holding the head count (updated after head pruning).
        head_dim_attr: the attribute holding the per-head width; ``None``: derived from ``qkv``.
        width_attrs: attributes holding ``num_heads * head_dim`` (updated after head pruning), e.g. ``("inner_dim",)``.
    """

    qkv: str | tuple[str, ...] = "qkv"
    proj: str = "proj"
    num_heads_attr: str = "num_heads"
    head_dim_attr: str | None = "head_dim"
    width_attrs: tuple[str, ...] = ()

    @property
    def projections(self) -> list[str]:
        return [self.qkv] if isinstance(self.qkv, str) else list(self.qkv)


LAYOUTS: dict[type, AttentionLayout] = {}  # declared attention classes (``register_attention``)


def register_attention(cls: type, layout: AttentionLayout | None = None, **fields: object) -> AttentionLayout:
    """Declare the head layout of an attention class, so ``prune(..., heads=True)`` removes whole heads from it.

    Example:
        >>> prunekit.register_attention(MyAttention, qkv="to_qkv", proj="to_out", num_heads_attr="heads",
        ...                             head_dim_attr="dim_head")
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(f"register_attention: {cls!r} is not an nn.Module class; pass the class itself")
    if layout is not None and fields:
        raise ConfigError("register_attention: pass a layout=AttentionLayout(...) or its fields, not both")
    try:
        layout = layout or AttentionLayout(**fields)  # type: ignore[arg-type]
    except TypeError as e:
        raise ConfigError(f"register_attention({cls.__name__}): {e}; fields: qkv, proj, num_heads_attr, "
                          "head_dim_attr, width_attrs") from None
    if not isinstance(layout.qkv, str) and len(layout.qkv) != 3:
        raise ConfigError(f"register_attention({cls.__name__}): qkv={layout.qkv!r}: one fused Linear name or "
                          "three names (q, k, v)")
    LAYOUTS[cls] = layout
    return layout


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
    layout: AttentionLayout | None = None  # declared with register_attention (kind "custom")

    def supports_head_pruning(self) -> str | None:
        """``None`` when whole heads can be removed, else the reason they cannot."""
        if self.bias_per_head and not callable(getattr(self.module, "remove_heads", None)):
            return "its relative-position bias table has one column per head, which torch-pruning does not prune"
        if self.kind == "other":
            return (f"unknown attention layout {type(self.module).__name__}; declare it with prunekit."
                    f"register_attention({type(self.module).__name__}, qkv=..., proj=..., num_heads_attr=..., "
                    "head_dim_attr=...)")
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
        if self.layout is not None:
            setattr(m, self.layout.num_heads_attr, num_heads)
            for attr in self.layout.width_attrs:
                setattr(m, attr, num_heads * self.head_dim)
        elif self.kind == "fused":
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
        layout = next((LAYOUTS[c] for c in type(m).__mro__ if c in LAYOUTS), None)
        if layout is not None:
            found.append(_declared(name, m, layout))
        elif isinstance(m, nn.MultiheadAttention):
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
        elif (plain := _plain_qkv_proj(m)) is not None:  # HF ViT-style q/k/v/o_proj without rotary or GQA
            found.append(_declared(name, m, plain, "q/k/v/o_proj without rotary embeddings"))
        elif all(_linear(m, a) is not None for a in ("q_proj", "k_proj", "v_proj")) and hasattr(m, "head_dim"):
            hd = int(m.head_dim)
            found.append(Attention(name, m, "llama", [prefix + a for a in ("q_proj", "k_proj", "v_proj")],
                                   m.q_proj.out_features // hd, hd, m.k_proj.out_features // hd))
        else:
            heads = next((getattr(m, a) for a in HEAD_ATTRS if isinstance(getattr(m, a, None), int)), None)
            linears = [n for n, c in m.named_children() if isinstance(c, nn.Linear)]
            if heads and len(linears) >= 2:
                found.append(Attention(name, m, "other", [prefix + n for n in linears[:-1]], heads, 0, heads))
    return found


HEAD_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads")


def _plain_qkv_proj(m: nn.Module) -> AttentionLayout | None:
    """The layout of a ``q_proj``/``k_proj``/``v_proj``/``o_proj`` attention (Hugging Face ViT, BERT-style models in
    transformers 5) whose forward takes no rotary ``position_embeddings`` and whose key/value heads are the query
    heads (no GQA): whole heads can go as in a declared layout. ``None`` for anything else."""
    import inspect

    if not all(_linear(m, a) is not None for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    heads_attr = next((a for a in ("num_attention_heads", "num_heads") if isinstance(getattr(m, a, None), int)), None)
    if heads_attr is None or not isinstance(getattr(m, "head_dim", None), int):
        return None
    try:
        rotary = "position_embeddings" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        rotary = True
    widths = {m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features}
    if rotary or len(widths) != 1:
        return None
    return AttentionLayout(qkv=("q_proj", "k_proj", "v_proj"), proj="o_proj", num_heads_attr=heads_attr,
                           head_dim_attr="head_dim")


def _declared(name: str, m: nn.Module, layout: AttentionLayout,
              source: str = "declared with register_attention") -> Attention:
    """The ``Attention`` of a module whose class was declared with ``register_attention`` (or has a known plain
    layout, ``source`` says which)."""
    where = f"attention {name!r} ({type(m).__name__}, {source})"
    linears = {}
    for attr in [*layout.projections, layout.proj]:
        sub = _linear(m, attr)
        if sub is None:
            raise PruningError(f"{where}: it has no nn.Linear {attr!r}; its Linear children: "
                               f"{[n for n, c in m.named_children() if isinstance(c, nn.Linear)]}")
        linears[attr] = sub
    heads = getattr(m, layout.num_heads_attr, None)
    if not isinstance(heads, int) or heads < 1:
        raise PruningError(f"{where}: num_heads_attr={layout.num_heads_attr!r} is {heads!r}, not a head count")
    blocks = 3 if isinstance(layout.qkv, str) else 1
    width = linears[layout.projections[0]].out_features
    hd = getattr(m, layout.head_dim_attr, None) if layout.head_dim_attr else width // (blocks * heads)
    if not isinstance(hd, int) or any(linears[p].out_features != blocks * heads * hd for p in layout.projections):
        raise PruningError(f"{where}: {layout.projections} have {width} outputs, expected {blocks} * {heads} heads "
                           f"* {hd} dims (head_dim_attr={layout.head_dim_attr!r})")
    prefix = f"{name}." if name else ""
    return Attention(name, m, "custom", [prefix + p for p in layout.projections], heads, hd, heads, layout=layout)


def sync_attributes(model: nn.Module) -> None:
    """Update attributes that a model reads in ``forward`` (or ``reset_classifier``, or its config) and
    torch-pruning does not know about: see ``prunekit.pruning.structured.families``."""
    sync_families(model)
