"""A user's own layers and known families' attributes: ``register_attention`` (heads=True on a user's attention),
``register_channel_mapping`` (a layer torch-pruning does not know), and attributes kept in line after pruning
(timm ``embed_dim``/``reset_classifier``, Hugging Face ``model.config``)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import prunekit
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured.heads import LAYOUTS
from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS


@pytest.fixture(autouse=True)
def _clean_registries():
    """Declarations made by a test do not leak into other tests."""
    layouts, pruners = dict(LAYOUTS), dict(CUSTOMIZED_PRUNERS)
    warnings.filterwarnings("ignore", message="Unwrapped parameters")
    yield
    LAYOUTS.clear(), LAYOUTS.update(layouts)
    CUSTOMIZED_PRUNERS.clear(), CUSTOMIZED_PRUNERS.update(pruners)


# ----------------------------------------------------------------------------------------------- user attention
class MyAttention(nn.Module):
    """Names prunekit cannot guess: ``to_qkv`` / ``to_out``, ``heads`` / ``dim_head``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.to_qkv(x).reshape(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1) * self.dim_head ** -0.5).softmax(dim=-1)
        return self.to_out((a @ v).transpose(1, 2).reshape(B, N, self.heads * self.dim_head))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.emb = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": MyAttention(dim, heads),
                                                   "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})
                                    for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for b in self.blocks:
            x = x + b["attn"](b["norm"](x))
            x = x + b["fc2"](F.gelu(b["fc1"](x)))
        return self.head(x.mean(dim=1))


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyTransformer().eval(), torch.randn(2, 6, 8)


def test_register_attention_prunes_whole_heads_of_a_user_attention():
    model, x = _transformer()
    prunekit.register_attention(MyAttention, qkv="to_qkv", proj="to_out", num_heads_attr="heads",
                                head_dim_attr="dim_head")
    report = prunekit.prune(model, x, criterion="l1", ratio=0.5, heads=True, scope="local")
    for b in model.blocks:
        attn = b["attn"]
        assert attn.heads == 2 and attn.dim_head == 8  # whole heads went, each head keeps its width
        assert attn.to_qkv.out_features == 3 * 2 * 8 and attn.to_out.in_features == 2 * 8
    assert any(getattr(r, "heads_after", None) == 2 for r in report.groups)
    assert model(x).shape == (2, 3)


def test_undeclared_attention_keeps_its_heads_and_names_the_fix():
    model, x = _transformer()
    with pytest.raises(PruningError, match="register_attention"):
        prunekit.prune(model, x, criterion="l1", ratio=0.5, heads=True, scope="local")
    model, x = _transformer()
    prunekit.prune(model, x, criterion="l1", ratio=0.5, scope="local")
    for b in model.blocks:  # the qkv group is left whole (a head layout it cannot see), the MLPs are pruned
        assert b["attn"].to_qkv.out_features == 96 and b["attn"].heads == 4
        assert b["fc1"].out_features < 64
    assert model(x).shape == (2, 3)


def test_register_attention_refuses_bad_declarations():
    with pytest.raises(ConfigError, match="nn.Module class"):
        prunekit.register_attention(object, qkv="qkv")
    with pytest.raises(ConfigError, match="qkv_name"):
        prunekit.register_attention(MyAttention, qkv_name="to_qkv")
    model, x = _transformer()
    prunekit.register_attention(MyAttention, qkv="qkv", proj="to_out", num_heads_attr="heads")
    with pytest.raises(PruningError, match="no nn.Linear 'qkv'.*to_qkv"):
        prunekit.prune(model, x, criterion="l1", ratio=0.5, heads=True)


# ----------------------------------------------------------------------------------------------- channel mapping
class WSConv(nn.Module):
    """A weight-standardised 3x3 conv holding its own parameters (torch-pruning sees only F.conv2d on them)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, padding=1)


class WSConvPruner(tp.pruner.BasePruningFunc):
    def prune_out_channels(self, layer: WSConv, idxs: list[int]) -> WSConv:
        keep = [i for i in range(layer.weight.shape[0]) if i not in set(idxs)]
        layer.weight = nn.Parameter(layer.weight.data[keep])
        layer.bias = nn.Parameter(layer.bias.data[keep])
        return layer

    def prune_in_channels(self, layer: WSConv, idxs: list[int]) -> WSConv:
        keep = [i for i in range(layer.weight.shape[1]) if i not in set(idxs)]
        layer.weight = nn.Parameter(layer.weight.data[:, keep])
        return layer

    def get_out_channels(self, layer: WSConv) -> int:
        return layer.weight.shape[0]

    def get_in_channels(self, layer: WSConv) -> int:
        return layer.weight.shape[1]


class WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.ws = WSConv(16, 16)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.ws(F.relu(self.c1(x))))
        return self.fc(F.relu(self.c3(x)).mean(dim=(2, 3)))


def test_register_channel_mapping_prunes_through_a_custom_layer():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = WSNet().eval()
    prunekit.prune(model, x, criterion="l1", ratio=0.3, scope="local")
    assert model.c1.out_channels == 16  # unknown layer: c1's group cannot be mapped, so it stays whole
    torch.manual_seed(0)
    model = WSNet().eval()
    prunekit.register_channel_mapping(WSConv, WSConvPruner)
    prunekit.prune(model, x, criterion="l1", ratio=0.3, scope="local")
    assert model.c1.out_channels == 11 and model.ws.weight.shape[1] == 11  # mapped through WSConv's inputs
    assert model(x).shape == (2, 4)
    with pytest.raises(ConfigError, match="BasePruningFunc"):
        prunekit.register_channel_mapping(WSConv, object())


# ----------------------------------------------------------------------------------------------- known families
def test_timm_vit_attributes_follow_the_pruned_width():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = prunekit.create_model("timm:vit_tiny_patch16_224", img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    prunekit.prune(model, x, criterion="l1", ratio=0.3, heads=True, scope="local")
    width = model.patch_embed.proj.out_channels
    assert width < 192  # the residual stream was pruned
    assert model.embed_dim == model.num_features == model.head_hidden_size == width
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_huggingface_config_follows_the_pruned_widths():
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prunekit.prune(model, x, criterion="l1", ratio=0.5, heads=True, scope="local")
    hidden = model.embeddings.word_embeddings.embedding_dim
    inter = {layer.intermediate.dense.out_features for layer in model.encoder.layer}
    heads = {layer.attention.self.num_attention_heads for layer in model.encoder.layer}
    assert model.config.hidden_size == hidden
    assert (hidden, inter, heads) != (32, {64}, {4})  # something was pruned
    assert model.config.intermediate_size == (inter.pop() if len(inter) == 1 else 64)
    assert model.config.num_attention_heads == (heads.pop() if len(heads) == 1 else 4)
    assert model(**x).last_hidden_state.shape == (2, 8, hidden)
