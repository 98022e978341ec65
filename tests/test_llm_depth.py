"""Depth pruning (prunekit.pruning.llm.depth) on tiny random Llama / Qwen2 / GPT-2: layer choice, reload, KV cache."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prunekit  # noqa: E402
from prunekit.errors import ConfigError, PruningError  # noqa: E402
from prunekit.pruning.llm import DepthConfig, prune_depth, save_pruned  # noqa: E402

V, T = 64, 16


def tiny(kind: str, layers: int = 4, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        c = transformers.GPT2Config(vocab_size=V, n_embd=32, n_inner=48, n_layer=layers, n_head=4, n_positions=32,
                                    bos_token_id=0, eos_token_id=0, **kw)
    else:
        cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
        c = cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=32, **kw)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def own_text(model: torch.nn.Module, n: int = 16, seed: int = 1) -> torch.Tensor:
    """Token ids sampled from ``model`` itself: on its own text a layer that matters raises the loss when removed
    (the expected increase is KL(model || model without it) >= 0), which random text does not guarantee."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, 1), generator=g)
    for _ in range(T - 1):
        p = model(input_ids=x).logits[:, -1].double().softmax(-1)
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
    return x


def make_identity(model: torch.nn.Module, i: int) -> None:
    """Layer ``i`` adds nothing to the residual stream: its o_proj and down_proj are zero."""
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            model.transformer.h[i].attn.c_proj.weight.zero_(), model.transformer.h[i].attn.c_proj.bias.zero_()
            model.transformer.h[i].mlp.c_proj.weight.zero_(), model.transformer.h[i].mlp.c_proj.bias.zero_()
        else:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("criterion", ["angular", "loss"])
def test_an_identity_layer_is_dropped_first_and_nothing_changes(kind, criterion):
    model = tiny(kind)
    make_identity(model, 2)
    with torch.no_grad():  # a confident model (peaked next-token distributions), so every real layer matters
        (model.transformer.ln_f if kind == "gpt2" else model.model.norm).weight.mul_(20)
    x = own_text(model, 32)
    dense = model(input_ids=x).logits
    rep = prune_depth(model, x, drop_layers=1, depth_criterion=criterion)
    assert rep["dropped"] == [2] and rep["layers"] == [4, 3]
    assert min(rep["scores"]) == pytest.approx(rep["scores"][2], abs=1e-6) and abs(rep["scores"][2]) < 1e-5
    torch.testing.assert_close(model(input_ids=x).logits, dense, rtol=1e-5, atol=1e-5)  # an identity removed


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_depth_pruned_model_reloads_generates_and_keeps_its_cache_right(kind, tmp_path):
    extra = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2} if kind == "qwen2" else {}
    tiny(kind, 6, **extra).save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    types = list(getattr(model.config, "layer_types", None) or [])
    x = ids()
    rep = prunekit.prune(model, None, DepthConfig(layers_ratio=0.34), calib_data=x)  # round(6 * 0.34) = 2
    kept = [i for i in range(6) if i not in rep["dropped"]]
    assert len(rep["dropped"]) == 2 and model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    if kind == "qwen2":
        assert model.config.layer_types == [types[i] for i in kept]
        assert model.config.max_window_layers == sum(i < 2 for i in kept)
        assert [layer.self_attn.layer_type for layer in model.model.layers] == model.config.layer_types
    prompt = x[:2, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)  # the KV cache addresses the renumbered layers
    save_pruned(model, tmp_path / "pruned", rep)
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["architectures"] == [type(model).__name__]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), cached)


def test_the_angular_score_follows_how_far_a_layer_turns_the_stream():
    model = tiny("llama")
    with torch.no_grad():  # layer 1 writes a tenth of what it wrote, layer 3 ten times more
        model.model.layers[1].mlp.down_proj.weight.mul_(0.1), model.model.layers[1].self_attn.o_proj.weight.mul_(0.1)
        model.model.layers[3].mlp.down_proj.weight.mul_(10), model.model.layers[3].self_attn.o_proj.weight.mul_(10)
    rep = prune_depth(model, ids(), drop_layers=2)
    s = rep["scores"]
    assert s[1] == min(s) and s[3] == max(s) and 1 in rep["dropped"] and 3 not in rep["dropped"]


def test_bad_depth_settings_are_clear_errors_and_leave_the_model():
    x = ids(4)
    with pytest.raises(ConfigError, match="drop_layers=2 and layers_ratio=0.5: give one of them"):
        DepthConfig(drop_layers=2, layers_ratio=0.5)
    with pytest.raises(ConfigError, match="remove no layer of 4"):
        prune_depth(tiny("llama"), x, layers_ratio=0.1)
    with pytest.raises(ConfigError, match="leaves none"):
        prune_depth(tiny("llama"), x, drop_layers=4)
    with pytest.raises(ConfigError, match="DepthConfig needs calib_data"):
        prunekit.prune(tiny("llama"), None, DepthConfig(drop_layers=1))
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="rolled back"):
        prunekit.prune(model, None, DepthConfig(drop_layers=1), calib_data=torch.full((2, T), V + 5))  # bad ids
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_prune_llm_drops_layers_alone_or_with_width(tmp_path, capsys):
    from prunekit.cli.main import main

    model = tiny("llama", 4)
    model.config.vocab_size = 256
    model.resize_token_embeddings(256)
    make_identity(model, 1)
    model.save_pretrained(tmp_path / "dense")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    args = ["--from", str(tmp_path / "dense"), "--calib-text", str(text), "--seq-len", "16", "--calib-samples", "8"]
    assert main(["prune-llm", *args, "--drop-layers", "1", "--out", str(tmp_path / "d")]) == 0
    rep = json.loads((tmp_path / "d" / "prune_report.json").read_text())
    assert rep["depth"]["dropped"] == [1] and rep["params_after"] < rep["params_before"]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_hidden_layers"] == 3
    assert main(["prune-llm", *args, "--layers-ratio", "0.5", "--mlp-ratio", "0.5", "--out", str(tmp_path / "w")]) == 0
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["mlp_bias"]) == (2, 24, False)
    assert len(json.loads((tmp_path / "w" / "prune_report.json").read_text())["layers"]) == 2  # width of 2 layers
    assert main(["eval", "--from", str(tmp_path / "w"), "--text", str(text), "--seq-len", "16"]) == 0
    capsys.readouterr()
    assert main(["prune-llm", *args, "--out", str(tmp_path / "n")]) == 2
    assert "--drop-layers" in capsys.readouterr().err
