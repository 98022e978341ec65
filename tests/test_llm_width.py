"""LLM width pruning (prunekit.pruning.llm) on tiny random-init Llama / Qwen2 / GPT-2 configs, and perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError, PruningError  # noqa: E402
from prunekit.measure.perplexity import perplexity  # noqa: E402
from prunekit.pruning.llm import kept_count, prune_width, save_pruned  # noqa: E402
from prunekit.pruning.llm.arch import weight_oi  # noqa: E402

V, T = 64, 16


def tiny(kind: str, **kw):
    torch.manual_seed(0)
    if kind == "llama":
        c = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=T, **kw)
    elif kind == "qwen2":
        c = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=T, **kw)
    else:
        c = transformers.GPT2Config(vocab_size=V, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=T,
                                    bos_token_id=0, eos_token_id=0, **kw)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def mlp_of(model, i: int = 0):
    return model.transformer.h[i].mlp if model.config.model_type == "gpt2" else model.model.layers[i].mlp


def down(model, i: int = 0):
    m = mlp_of(model, i)
    return m.c_proj if hasattr(m, "c_proj") else m.down_proj


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("comp", ["none", "lstsq"])
def test_mlp_shapes_config_and_reload(kind, comp, tmp_path):
    model = tiny(kind)
    x = ids()
    dense_logits = model(input_ids=x).logits
    rep = prune_width(model, x, mlp_ratio=0.5, criterion="variance", compensate=comp)
    width = "n_inner" if kind == "gpt2" else "intermediate_size"
    assert getattr(model.config, width) == 24
    for i in range(2):
        assert weight_oi(down(model, i)).shape == (32, 24)
    assert rep["params_after"] < rep["params_before"]
    logits = model(input_ids=x).logits
    assert logits.shape == dense_logits.shape
    save_pruned(model, tmp_path, rep)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "prune_report.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gqa_group_bookkeeping_and_reload(kind, tmp_path):
    model = tiny(kind)
    x = ids()
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim  # 4
    q0, k0 = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    comp = "mean" if kind == "llama" else "lstsq"  # mean: with the attention biases switched on (add_bias)
    rep = prune_width(model, x, head_ratio=0.5, criterion="magnitude", compensate=comp, add_bias=kind == "llama",
                      reconstruct_steps=0)  # the kept rows are compared as they were
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == (4, 2, hd, 32)
    assert attn.q_proj.weight.shape == (4 * hd, 32) and attn.k_proj.weight.shape == (2 * hd, 32)
    assert attn.v_proj.weight.shape == (2 * hd, 32) and attn.o_proj.weight.shape == (32, 4 * hd)
    groups = rep["layers"][0]["groups"]
    assert len(groups) == 2
    # the kept rows are the query heads of the kept groups (2 query heads per key-value head), in order
    q_rows = torch.cat([q0[g * 2 * hd:(g + 1) * 2 * hd] for g in groups])
    torch.testing.assert_close(attn.q_proj.weight.detach(), q_rows)
    torch.testing.assert_close(attn.k_proj.weight.detach(), torch.cat([k0[g * hd:(g + 1) * hd] for g in groups]))
    logits = model(input_ids=x).logits
    save_pruned(model, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)


def test_hand_set_channels_and_groups_are_kept():
    model = tiny("llama")
    strong = [1, 4, 7, 10, 20, 33, 40, 47]
    mlp = mlp_of(model)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.mul_(0.01)
            lin.weight[strong] *= 300
        mlp.down_proj.weight.mul_(0.01)
        mlp.down_proj.weight[:, strong] *= 300
        attn = model.model.layers[0].self_attn
        for g in (1, 2):  # groups 1 and 2 tiny: magnitude must keep 0 and 3
            attn.k_proj.weight[g * 4:(g + 1) * 4] *= 1e-3
            attn.v_proj.weight[g * 4:(g + 1) * 4] *= 1e-3
            attn.q_proj.weight[g * 8:(g + 1) * 8] *= 1e-3
            attn.o_proj.weight[:, g * 8:(g + 1) * 8] *= 1e-3
    up = mlp.up_proj.weight.detach().clone()
    rep = prune_width(model, ids(), mlp_ratio=40 / 48, head_ratio=0.5, criterion="magnitude",
                      compensate="none")
    torch.testing.assert_close(mlp.up_proj.weight.detach(), up[strong])
    assert rep["layers"][0]["groups"] == [0, 3]


def test_variance_follows_activations():
    """A channel whose up_proj row is zero has zero activation: variance drops it, however large its weights."""
    model = tiny("llama")
    dead = [0, 5, 9, 30]
    with torch.no_grad():
        for i in range(2):
            m = mlp_of(model, i)
            m.up_proj.weight[dead] = 0.0
            m.gate_proj.weight[dead] *= 50  # large weights: magnitude keeps them
    for crit, dropped in (("variance", True), ("magnitude", False)):
        m2 = tiny("llama")
        m2.load_state_dict(model.state_dict())
        prune_width(m2, ids(), mlp_ratio=0.25, criterion=crit, compensate="none")
        kept = mlp_of(m2).gate_proj.weight.detach()
        found = [any(torch.equal(kept[j], mlp_of(model).gate_proj.weight[d].detach()) for j in range(len(kept)))
                 for d in dead]
        assert not any(found) if dropped else all(found), crit


def test_wanda_scores_match_hand_computation():
    model = tiny("llama")
    x = ids()
    mlp = mlp_of(model)
    seen = {}
    hs = [mlp.gate_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0])),
          mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("h", []).append(a[0]))]
    with torch.no_grad():
        model(input_ids=x)
    for h in hs:
        h.remove()
    xn = torch.cat(seen["x"]).flatten(0, 1).double().norm(dim=0)  # (hidden,)
    hn = torch.cat(seen["h"]).flatten(0, 1).double().norm(dim=0)  # (intermediate,)
    W = {k: getattr(mlp, k).weight.detach().double().abs() for k in ("gate_proj", "up_proj", "down_proj")}
    score = W["gate_proj"] @ xn + W["up_proj"] @ xn + hn * W["down_proj"].sum(0)
    expect = torch.topk(score, 24).indices.sort().values
    up = mlp.up_proj.weight.detach().clone()
    prune_width(model, x, mlp_ratio=0.5, criterion="wanda", compensate="none")
    torch.testing.assert_close(mlp.up_proj.weight.detach(), up[expect])


def _down_outputs(model, x, layer: int = 0):
    outs = []
    h = down(model, layer).register_forward_hook(lambda m, a, o: outs.append(o.detach().flatten(0, 1)))
    with torch.no_grad():
        model(input_ids=x)
    h.remove()
    return torch.cat(outs).double()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("comp", ["mean", "lstsq"])
def test_compensation_keeps_mean_of_down_proj(kind, comp):
    model = tiny(kind)
    x = ids(48)
    if kind == "llama":  # up = gate: act(g) * g >= -0.28, far from centred, so the mean matters
        with torch.no_grad():
            for i in range(2):
                mlp_of(model, i).up_proj.weight.copy_(mlp_of(model, i).gate_proj.weight)
    plain = tiny(kind)
    plain.load_state_dict(model.state_dict())
    before = _down_outputs(model, x).mean(0)
    prune_width(model, x, mlp_ratio=0.5, criterion="variance", compensate=comp, add_bias=kind == "llama")
    tol = 1e-4 * float(before.abs().max())
    torch.testing.assert_close(_down_outputs(model, x).mean(0), before, rtol=0, atol=tol)
    prune_width(plain, x, mlp_ratio=0.5, criterion="variance", compensate="none")
    assert (_down_outputs(plain, x).mean(0) - before).abs().max() > 30 * tol  # without compensation it moves


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_lstsq_beats_none_and_mean_on_calibration_error(kind):
    x = ids(48)
    dense = _down_outputs(tiny(kind), x)
    err = {}
    for comp in ("none", "mean", "lstsq") if kind != "qwen2" else ("none", "lstsq"):
        m = tiny(kind)
        prune_width(m, x, mlp_ratio=0.5, criterion="magnitude", compensate=comp, add_bias=kind == "llama")
        err[comp] = (_down_outputs(m, x) - dense).square().mean().item()
    assert err["lstsq"] < err["none"]
    if "mean" in err:
        assert err["mean"] < err["none"] and err["lstsq"] < err["mean"]


def test_sequential_and_one_shot_both_prune():
    x = ids()
    a, b = tiny("llama"), tiny("llama")
    prune_width(a, x, mlp_ratio=0.5, compensate="lstsq", sequential=True)
    prune_width(b, x, mlp_ratio=0.5, compensate="lstsq", sequential=False)
    # layer 0 sees the same input either way; layer 1 sees the pruned layer 0 only when sequential
    torch.testing.assert_close(down(a, 0).weight, down(b, 0).weight)
    assert not torch.allclose(down(a, 1).weight, down(b, 1).weight)


def test_errors_for_bad_input():
    x = ids()
    with pytest.raises(ConfigError, match="nothing would be pruned"):
        prune_width(tiny("llama"), x)
    with pytest.raises(ConfigError, match="criterion"):
        prune_width(tiny("llama"), x, mlp_ratio=0.5, criterion="l7")
    with pytest.raises(ConfigError, match="mlp_ratio"):
        prune_width(tiny("llama"), x, mlp_ratio=1.5)
    with pytest.raises(ConfigError, match="head_ratio"):
        prune_width(tiny("gpt2"), x, head_ratio=0.5)
    with pytest.raises(ConfigError, match="keeps all 4 key-value groups"):
        prune_width(tiny("llama"), x, head_ratio=0.1)
    q = tiny("qwen2")
    w = q.model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(PruningError, match="cannot express a bias"):
        prune_width(q, x, mlp_ratio=0.5, compensate="mean")
    torch.testing.assert_close(q.model.layers[0].mlp.down_proj.weight, w)  # refused before any change
    with pytest.raises(PruningError, match="empty"):
        prune_width(tiny("llama"), [], mlp_ratio=0.5)
    with pytest.raises(ConfigError, match=r"\(N, T\)"):
        prune_width(tiny("llama"), torch.zeros(5, dtype=torch.long), mlp_ratio=0.5)
    bert = transformers.AutoModel.from_config(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(PruningError, match="not supported"):
        prune_width(bert, x, mlp_ratio=0.5)


def test_kept_count():
    assert kept_count(48, 0.5) == 24
    assert kept_count(48, 0.5, 16) == 32  # 1.5 multiples of 16 round to 2
    assert kept_count(48, 0.9, 16) == 16  # never below one multiple
    assert kept_count(4, 0.99) == 1


def test_perplexity_of_uniform_and_perfect_models():
    class Const(torch.nn.Module):
        def __init__(self, logits_fn):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.fn = logits_fn

        def forward(self, x):
            return self.fn(x)

    tokens = torch.randint(0, V, (10 * T + 3,), generator=torch.Generator().manual_seed(0))
    uniform = Const(lambda x: torch.zeros(*x.shape, V))
    assert math.isclose(perplexity(uniform, tokens, seq_len=T, batch_size=3), V, rel_tol=1e-6)

    def oracle(x):  # knows the next token (reads it from the stream): perplexity 1
        nxt = torch.roll(x, -1, dims=1)
        return torch.nn.functional.one_hot(nxt, V).float() * 50
    assert perplexity(Const(oracle), tokens, seq_len=T) < 1.0001
    with pytest.raises(ConfigError, match="seq_len"):
        perplexity(uniform, tokens[:5], seq_len=T)


def test_cli_prune_llm_and_eval_text(tmp_path, capsys):
    from prunekit.cli.main import main

    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "dense")
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "pruned"
    assert main(["prune-llm", "--from", str(tmp_path / "dense"), "--calib-text", str(text), "--seq-len", "32",
                 "--calib-samples", "8", "--mlp-ratio", "0.5", "--head-ratio", "0.5", "--compensate", "mean",
                 "--add-bias", "--eval-text", str(text), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "prune_report.json", "metrics.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["mlp_bias"]) == (24, 1, True)
    capsys.readouterr()
    assert main(["eval", "--from", str(out), "--text", str(text), "--seq-len", "32"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert math.isclose(shown["perplexity"], metrics["ppl_after"], rel_tol=1e-5)
    with pytest.raises(SystemExit):
        main(["prune-llm", "--from", str(tmp_path / "dense"), "--calib-text", str(text), "--mlp-ratio", "0.5",
              "--criterion", "l9", "--out", str(tmp_path / "x")])
    from prunekit.pruning.llm.criteria import list_criteria

    err = capsys.readouterr().err
    assert "invalid choice: 'l9' (choose from " in err and all(repr(c) in err for c in list_criteria())
    assert main(["prune-llm", "--from", str(tmp_path / "dense"), "--calib-text", str(text), "--seq-len", "32",
                 "--mlp-ratio", "0.25", "--ridge", "0.1", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "prune_report.json").read_text())["layers"][0]["ridge"] == 0.1


def test_cli_refuses_an_empty_text_an_encoder_a_damaged_model_and_a_taken_out_before_any_work(tmp_path, capsys,
                                                                                            monkeypatch):
    from prunekit.cli.main import main
    from prunekit.pipeline import llm

    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "dense")
    text, empty = tmp_path / "t.txt", tmp_path / "empty.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    empty.write_text("\n  \n")
    args = ["--calib-text", str(text), "--seq-len", "32", "--calib-samples", "4"]

    def err(argv):
        assert main(argv) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e
        return e

    assert "is empty" in err(["prune-llm", "--from", str(tmp_path / "dense"), "--calib-text", str(empty),
                              "--mlp-ratio", "0.5", "--out", str(tmp_path / "a")])
    transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=48)
                           ).save_pretrained(tmp_path / "bert")
    assert "holds BertModel, not a causal (decoder) LM" in err(
        ["sparsify", "--from", str(tmp_path / "bert"), "--method", "wanda", "--sparsity", "0.5", *args,
         "--out", str(tmp_path / "b")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tmp_path / "dense" / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "its weights cannot be loaded" in err(["prune-llm", "--from", str(broken), *args, "--mlp-ratio", "0.5",
                                                  "--out", str(tmp_path / "c")])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    monkeypatch.setattr(llm, "load_causal_lm", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    assert "already holds a run" in err(["prune-llm", "--from", str(tmp_path / "dense"), *args, "--mlp-ratio",
                                         "0.5", "--out", str(taken)])


def test_a_head_ratio_between_whole_groups_is_said(caplog):
    model = tiny("llama")  # 8 heads in 4 key-value groups
    with caplog.at_level("INFO"):
        prune_width(model, ids(), head_ratio=0.3, criterion="magnitude")
    assert "head_ratio=0.3 removes whole key-value groups: 3 of 4 kept, i.e. a head sparsity of 0.250" in caplog.text
    assert "heads 8 -> 6 (4 -> 3 key-value groups)" in caplog.text
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 6
