"""Users' own models of shapes the other tests lack: a recurrent head after convs (``nn.GRU`` / ``nn.RNN``), a learned
query token read through ``nn.MultiheadAttention``, and torchvision segmentation models by registry name."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message="Unwrapped parameters")


# ----------------------------------------------------------------------------------------------- recurrent head
class AudioNet(nn.Module):
    """A 1-D conv front end over mel frames, then a recurrent layer and a linear classifier on its last step."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.c1, self.c2, self.rnn, self.fc = nn.Conv1d(8, 16, 3, padding=1), nn.Conv1d(16, 24, 3, padding=1), rnn, \
            nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, mels, T)
        h = F.relu(self.c2(F.relu(self.c1(x)))).transpose(1, 2)  # (B, T, C)
        out, _ = self.rnn(h)  # (B, T, H * directions)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("rnn", [lambda: nn.GRU(24, 12, batch_first=True),
                                 lambda: nn.GRU(24, 6, num_layers=2, bidirectional=True, batch_first=True),
                                 lambda: nn.RNN(24, 12, batch_first=True)], ids=["gru", "gru-bi-2", "rnn"])
def test_the_conv_feeding_a_recurrent_layer_is_pruned_with_its_inputs(rnn):
    """torch-pruning took the GRU for an element-wise layer and mapped c2's channels onto its hidden units (an
    IndexError: prune() refused the whole model). Now c2 and the recurrent layer's inputs are pruned together."""
    torch.manual_seed(0)
    model, x = AudioNet(rnn()).eval(), torch.randn(2, 8, 10)
    hidden = model.rnn.hidden_size
    report = prunekit.prune(model, x, "l1", ratio=0.5, scope="local")
    assert model.c2.out_channels == model.rnn.input_size == 12  # pruned together
    assert model.rnn.weight_ih_l0.shape[1] == 12 and model.rnn.hidden_size == hidden  # hidden units stay
    if model.rnn.bidirectional:
        assert model.rnn.weight_ih_l0_reverse.shape[1] == 12
    assert "c2" in report.layers and not report.left_whole
    assert model(x).shape == (2, 4)
    model(torch.randn(3, 8, 7)).sum().backward()  # trains after pruning (the flat weights were refreshed)


def test_pruned_recurrent_layer_keeps_the_outputs_of_the_kept_channels():
    """Masked == pruned: zeroing c2's removed channels gives the same outputs as removing them."""
    torch.manual_seed(0)
    model, x = AudioNet(nn.GRU(24, 12, batch_first=True)).double().eval(), torch.randn(2, 8, 10).double()
    masked = AudioNet(nn.GRU(24, 12, batch_first=True)).double().eval()
    masked.load_state_dict(model.state_dict())
    prunekit.prune(model, x, "l1", ratio=0.5, scope="local", ignore=["c1"])
    kept = [i for i in range(24) if any(torch.equal(model.c2.weight[j], masked.c2.weight[i]) for j in range(12))]
    drop = torch.ones(24, dtype=torch.double)
    drop[[i for i in range(24) if i not in kept]] = 0
    with torch.no_grad():
        masked.c2.weight.mul_(drop.view(-1, 1, 1)), masked.c2.bias.mul_(drop)
        torch.testing.assert_close(model(x), masked(x), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------- learned query
class QueryPool(nn.Module):
    """Conv tokens pooled by attention from one learned query token (``nn.MultiheadAttention``, batch_first)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)
        o, _ = self.attn(self.query.expand(t.shape[0], -1, -1), t, t)  # (B, 1, C)
        return self.head((o + self.mlp(o))[:, 0])


def test_a_learned_query_token_is_counted_and_pruned():
    """Under no_grad, ``query.expand(...)`` requires grad without a grad function and the MACs counter failed on it
    ("Expected gradient function to be set"): count_macs, prune(target_macs=...) and sparsity all refused."""
    torch.manual_seed(0)
    model, x = QueryPool().eval(), torch.randn(2, 3, 16, 16)
    macs = prunekit.count_macs(model, x)
    assert macs > 0 and all(p.requires_grad for p in model.parameters())  # restored after counting
    report = prunekit.prune(model, x, target_macs=0.7, calib_data=[torch.randn(8, 3, 16, 16) for _ in range(2)])
    assert report.macs_after < macs and model.mlp[0].out_features < 32
    assert model(x).shape == (2, 3)
    prunekit.prune(model, x, prunekit.SparsityConfig(sparsity=0.5))
    assert model(x).shape == (2, 3)


# ----------------------------------------------------------------------------------------------- segmentation
def test_torchvision_segmentation_by_name_prunes_and_round_trips(tmp_path):
    """``tv:lraspp_mobilenet_v3_large`` was an unknown name (only classification and detection were listed)."""
    torch.manual_seed(0)
    model = prunekit.create_model("tv:lraspp_mobilenet_v3_large", num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    report = prunekit.prune(model, x, "l1", target_macs=0.6)
    assert report.macs_after < report.macs_before and model(x)["out"].shape == (1, 3, 64, 64)
    prunekit.save_model(tmp_path, model)
    loaded = prunekit.load_model(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["out"], model(x)["out"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- Hugging Face config
def test_pruning_a_transformers_model_leaves_the_callers_config_alone(tmp_path):
    """The model's config follows the pruned widths, on the model's own copy: the config object the user built the
    model from was changed in place (hidden_size 21 with 4 heads), so a second model built from it (a teacher, the
    dense reference of a builder for save_model) failed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prunekit.prune(model, x, "l1", ratio=0.3)
    hidden = model.bert.embeddings.word_embeddings.embedding_dim
    assert hidden < 32 and model.config.hidden_size == hidden and model.bert.config is model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (32, 64, 4)
    prunekit.save_model(tmp_path, model, builder=lambda: transformers.BertForSequenceClassification(cfg))
    loaded = prunekit.load_model(tmp_path, builder=lambda: transformers.BertForSequenceClassification(cfg)).eval()
    torch.testing.assert_close(loaded(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-5)


def test_a_failing_builder_says_why(tmp_path):
    def builder() -> nn.Module:
        raise ValueError("The hidden size (21) is not a multiple of the number of attention heads (4)")

    with pytest.raises(prunekit.ConfigError, match=r"failed to build the dense model .*ValueError: The hidden size"):
        prunekit.save_model(tmp_path, nn.Linear(3, 2), builder=builder)
    assert not (tmp_path / "model.json").exists()


# ----------------------------------------------------------------------------------------------- --model module:Class
class UserNet(nn.Module):
    """A user's CNN taking the dataset's channels and classes, and one option of its own."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(in_channels, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(dim=(2, 3)))


def test_create_model_takes_a_users_module_path(tmp_path):
    """``--model mypkg.nets:Net`` (the CLI's create_model): was "unknown prefix"; now imported and called with
    in_channels / num_classes (where its signature names them) and --model-kwargs, and rebuilt by name."""
    model = prunekit.create_model(f"{__name__}:UserNet", in_channels=1, num_classes=10, width="6")
    assert type(model).__name__ == "UserNet" and (model.c1.in_channels, model.c1.out_channels) == (1, 6)
    assert model.fc.out_features == 10
    x = torch.randn(2, 1, 8, 8)
    prunekit.prune(model.eval(), x, "l1", ratio=0.5, scope="local")
    prunekit.save_model(tmp_path, model)
    loaded = prunekit.load_model(tmp_path).eval()
    assert loaded.c1.out_channels == model.c1.out_channels == 3
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(prunekit.ConfigError, match=r"'nosuchpkg:' and not an importable model.*module.path:Class"):
        prunekit.create_model("nosuchpkg:Net")
    with pytest.raises(prunekit.ConfigError, match=r"bad constructor argument.*--model-kwargs"):
        prunekit.create_model(f"{__name__}:UserNet", depth=3)


def test_an_unreachable_target_names_the_groups_left_whole():
    """The GRU cannot be compensated, so with calibration data (compensate='auto': lstsq) c2's group stays whole
    and a low target is out of reach: the error says which group and why (it only said "raise max_ratio")."""
    torch.manual_seed(0)
    model, x = AudioNet(nn.GRU(24, 12, batch_first=True)).eval(), torch.randn(2, 8, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(8, 8, 10) for _ in range(2)]
    with pytest.raises(prunekit.PruningError, match=r"out of reach.*left whole, e\.g\. 'c2': .*can be compensated"):
        prunekit.prune(model, x, target_macs=0.3, calib_data=calib)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report = prunekit.prune(model, x, target_macs=0.3, calib_data=calib, compensate="none")
    assert report.macs_after <= 0.31 * report.macs_before and model.rnn.input_size < 24


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_a_bare_transformers_model_saves_without_a_builder(tmp_path, kind):
    """A transformers model built from a config by the user: save_model said "needs constructor arguments" (its
    config is no JSON kwarg). Now the class and the dense config are recorded, the pruned config fields restored."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=16)
        model = transformers.BertForSequenceClassification(cfg).eval()
    else:
        cfg = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=16)
        model = transformers.DistilBertForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prunekit.prune(model, x, "l1", ratio=0.4, heads=kind == "bert")  # DistilBERT's attention: no head layout
    assert model.config.to_dict() != cfg.to_dict()  # the model's config follows the pruned widths
    prunekit.save_model(tmp_path, model)
    loaded = prunekit.load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.config.to_dict() == model.config.to_dict()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(loaded(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-5)


class ResidualMLP(nn.Module):
    """Tokens through two pre-norm residual MLP blocks: the stream (``emb``'s outputs) is one prunable group."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = nn.Linear(6, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
                                    for _ in range(2))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6)
        h = self.emb(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h.mean(1))


def test_default_refit_skips_blocks_whose_stream_was_pruned(caplog):
    """refit (on by default with lstsq) raised "'blocks.0' sees (8, 5, 12) in the pruned model but (8, 5, 16) in
    the dense one" wherever the residual stream was pruned (Hugging Face BERT / ViT, a ConvNeXt block, ...); those
    layers are now kept as compensated, and the call prunes the stream."""
    torch.manual_seed(0)
    model, x = ResidualMLP().eval(), torch.randn(2, 5, 6)
    dense = copy.deepcopy(model)
    calib = [torch.randn(8, 5, 6) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="prunekit"):
        report = prunekit.prune(model, x, target_macs=0.5, calib_data=calib)
    assert model.emb.out_features < 16 and model(x).shape == (2, 3)  # the stream was pruned
    assert report.compensate == "lstsq"
    skipped = [r for r in caplog.records if "kept as compensated" in r.getMessage()]
    assert skipped and all(r.levelno == logging.INFO for r in skipped)  # the default refit: no warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prunekit"):
        prunekit.prune(dense, x, target_macs=0.5, calib_data=calib, refit=True)
    assert any(r.levelno == logging.WARNING and "kept as compensated" in r.getMessage() for r in caplog.records)


def test_hf_vit_heads_are_pruned_whole():
    """transformers 5's ViT attention has q/k/v/o_proj like a Llama but no rotary embeddings and no GQA:
    ``heads=True`` removes whole heads (it was refused as 'rotary (LLaMA-style)')."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    prunekit.prune(model, x, ratio=0.5, heads=True, scope="local",
                   calib_data=[torch.randn(4, 3, 32, 32) for _ in range(3)])
    attn = [m for n, m in model.named_modules() if type(m).__name__ == "ViTAttention"]
    assert len(attn) == 2
    for a in attn:
        assert a.num_attention_heads == 2 and a.q_proj.out_features == 2 * a.head_dim == a.o_proj.in_features
    assert model(pixel_values=x).logits.shape == (2, 3)
