"""Hidden-size pruning of Llama-style decoders (prunekit.pruning.llm.hidden) on tiny random-init configs."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError, PruningError  # noqa: E402
from prunekit.pruning.llm import prune_hidden, save_pruned  # noqa: E402

V, T = 64, 16


def tiny(kind: str = "llama", **kw):
    torch.manual_seed(0)
    cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    c = cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=T, **kw)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True])
def test_every_stream_tensor_shrinks_and_the_model_reloads(kind, tie, tmp_path):
    model = tiny(kind, tie_word_embeddings=tie)
    rep = prune_hidden(model, ids(), keep=0.75)
    assert rep["hidden_size"] == [32, 24] and model.config.hidden_size == 24 and model.config.head_dim == 4
    layer = model.model.layers[0]
    assert model.model.embed_tokens.weight.shape == (V, 24) and model.lm_head.weight.shape == (V, 24)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert layer.self_attn.q_proj.weight.shape == (32, 24) and layer.self_attn.o_proj.weight.shape == (24, 32)
    assert layer.mlp.gate_proj.weight.shape == (48, 24) and layer.mlp.down_proj.weight.shape == (24, 48)
    assert layer.input_layernorm.weight.shape == (24,) and model.model.norm.weight.shape == (24,)
    x = ids(4, seed=7)
    logits = model(input_ids=x).logits
    assert logits.shape == (4, T, V) and torch.isfinite(logits).all()
    save_pruned(model, tmp_path, rep)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=x).logits, logits)


def test_activation_keeps_the_channels_the_stream_uses_most():
    model = tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 30  # channel 5 dominates the stream
        model.model.embed_tokens.weight[:, 9] *= 0.01  # channel 9 carries next to nothing
    rep = prune_hidden(model, ids(), keep=0.5)
    assert 5 in rep["kept"] and 9 not in rep["kept"]


def _uneven() -> torch.nn.Module:
    """A tiny Llama whose stream channels differ in scale (as trained ones do): channels 0-7 x4, 24-31 x0.25."""
    m = tiny()
    with torch.no_grad():
        m.model.embed_tokens.weight[:, :8] *= 4
        m.model.embed_tokens.weight[:, 24:] *= 0.25
    return m


def test_rms_correction_keeps_the_normed_scale():
    x = ids()
    seen = {}

    def first_norm_scale(m, kept=None):
        out = m.model.layers[0].input_layernorm(m.model.embed_tokens(x))
        return out.square().mean().item() if kept is None else out[..., kept].square().mean().item()

    dense = _uneven()
    for corr in (True, False):
        m = _uneven()
        rep = prune_hidden(m, x, keep=0.5, rms_correction=corr)
        seen[corr] = first_norm_scale(m) / first_norm_scale(dense, rep["kept"])
        if corr:
            assert all(f > 1 for f in rep["rms_correction"].values())  # the strongest channels stay: rms grows
    assert abs(seen[True] - 1) < 0.05 < abs(seen[False] - 1), seen  # the kept channels' normed scale is kept


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="keep=1.2 must be in"):
        prune_hidden(tiny(), ids(), keep=1.2)
    with pytest.raises(ConfigError, match="criterion 'l3' is not one of activation, magnitude, random"):
        prune_hidden(tiny(), ids(), criterion="l3")
    with pytest.raises(PruningError, match="need calibration token ids"):
        prune_hidden(tiny(), None, keep=0.5)
    assert prune_hidden(tiny(), None, keep=0.5, criterion="magnitude", rms_correction=False)["hidden_size"] == [32, 16]
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=T, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ConfigError, match="derives head_dim from the hidden size"):
        prune_hidden(gpt2, ids(), keep=0.5)


def test_prune_width_takes_hidden_ratio_with_the_mlp(tmp_path):
    from prunekit.pruning.llm import prune_width

    model = tiny()
    rep = prune_width(model, ids(), mlp_ratio=0.5, hidden_ratio=0.25, criterion="variance", compensate="lstsq")
    assert rep["hidden_size"] == [32, 24] and rep["intermediate_size"] == [48, 24]
    assert model.model.layers[1].mlp.down_proj.weight.shape == (24, 24)
    x = ids(4, seed=3)
    logits = model(input_ids=x).logits
    save_pruned(model, tmp_path, rep)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=x).logits, logits)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=T, bos_token_id=0, eos_token_id=0))
    w = gpt2.transformer.h[0].mlp.c_fc.weight.clone()
    with pytest.raises(ConfigError, match="hidden_ratio=0.5: model_type 'gpt2' derives head_dim"):
        prune_width(gpt2, ids(), mlp_ratio=0.5, hidden_ratio=0.5)
    assert torch.equal(gpt2.transformer.h[0].mlp.c_fc.weight, w)  # refused before anything was pruned
    model = tiny()
    w = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ConfigError, match="hidden_ratio=0.01 keeps all 32 hidden channels"):
        prune_width(model, ids(), mlp_ratio=0.5, hidden_ratio=0.01)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, w)  # refused before the MLP was pruned
