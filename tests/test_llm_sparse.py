"""Unstructured and N:M sparsity of decoder-only LMs (Wanda, SparseGPT) on tiny random-init transformers configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.llm.sparse import (
    decoder_blocks,
    decoder_linears,
    magnitude_mask,
    prune_decoder,
    sparsegpt_prune,
    wanda_mask,
)
from prunekit.pruning.unstructured import get_mask, nm_violations, sparsify
from prunekit.pruning.unstructured.layers import gemm_weight

transformers = pytest.importorskip("transformers")
VOCAB = 61


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def calib(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(n)]


def correlated_inputs(tokens: int = 1024, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features (a decaying spectrum, mixed) and unequal scales, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    latent = torch.randn(tokens, dim, generator=g) * torch.logspace(0, -1, dim)[None, :]
    return (latent @ mix.T) * torch.exp(0.7 * torch.randn(dim, generator=g))[None, :]


# ----------------------------------------------------------------------------------------------- criteria
def test_wanda_picks_the_hand_predicted_weights():
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                      [1.0, 1.0, 2.0, 1.0]])
    sq_norm = torch.tensor([0.01, 100.0, 1.0, 1.0])  # ||X_j|| = 0.1, 10, 1, 1
    # row 0 scores 0.4, 10, 3, 2 -> keep columns 1 and 2 (magnitude would keep 0 and 2); row 1: 0.1, 10, 2, 1
    keep = wanda_mask(w, sq_norm, 0.5)
    assert keep.tolist() == [[False, True, True, False], [False, True, True, False]]
    assert magnitude_mask(w, 0.25).tolist()[0] == [True, False, True, True]
    # 2:4 with the same scores: one group of 4 per row, the same two survive
    assert wanda_mask(w, sq_norm, 0.5, nm=(2, 4)).tolist() == keep.tolist()


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4)])
def test_masks_are_exact(nm):
    torch.manual_seed(0)
    w, x = torch.randn(24, 40), correlated_inputs(256, 40)
    h = x.T @ x
    for name, keep in [("magnitude", magnitude_mask(w, 0.6, nm)), ("wanda", wanda_mask(w, x.pow(2).sum(0), 0.6, nm)),
                       ("sparsegpt", sparsegpt_prune(w, h, 0.6, nm, blocksize=16)[1])]:
        if nm is None:
            if name == "wanda":  # compared within each output row: every row exactly round(0.6 * 40) = 24 zeros
                assert (~keep).sum(1).tolist() == [24] * 24, name
            else:
                assert int((~keep).sum()) == round(0.6 * w.numel()), name
        else:
            n, m = nm
            groups = keep.reshape(24, -1, m).sum(-1)
            assert (groups == n).all(), name  # exactly N kept in every group of M along the input


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    torch.manual_seed(0)
    x = correlated_inputs()
    w = torch.randn(64, 64)
    h = x.T @ x
    ref = x @ w.T

    def err(w2: torch.Tensor) -> float:
        return float((ref - x @ w2.T).norm() / ref.norm())

    for sparsity, nm in [(0.5, None), (0.7, None), (None, (2, 4))]:
        s = 0.5 if sparsity is None else sparsity
        new, keep = sparsegpt_prune(w, h, s, nm, blocksize=32)
        assert bool((new[~keep] == 0).all()) and int((new == 0).sum()) == int((~keep).sum())
        e_sgpt = err(new)
        e_wanda = err(w * wanda_mask(w, x.pow(2).sum(0), s, nm))
        e_mag = err(w * magnitude_mask(w, s, nm))
        # the OBS update is what makes the difference: the same mask without it is no better than Wanda's
        e_mask_only = err(w * keep)
        assert e_sgpt < 0.9 * e_wanda and e_sgpt < 0.9 * e_mag, (sparsity, nm, e_sgpt, e_wanda, e_mag)
        assert e_sgpt < 0.9 * e_mask_only, (sparsity, nm, e_sgpt, e_mask_only)
        assert e_wanda < e_mag, (sparsity, nm, e_wanda, e_mag)


def test_sparsegpt_handles_dead_inputs_and_tiny_hessians():
    torch.manual_seed(0)
    x = correlated_inputs(8, 16)  # fewer tokens than inputs: X^T X is singular, the damping makes it invertible
    x[:, 3] = 0  # an input that never fires
    w = torch.randn(8, 16)
    new, keep = sparsegpt_prune(w, x.T @ x, 0.5)
    assert torch.isfinite(new).all() and int((~keep).sum()) == 64


# ----------------------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_qwen2])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_decoder_pruned_block_by_block_reaches_the_sparsity(build, method):
    model, data = build(), calib()
    dense_logits = model(data[0]).logits
    head = model.lm_head.weight.clone()
    r = prune_decoder(model, method, sparsity=0.5, calib_data=data)
    names = decoder_linears(model)
    assert set(r.layers) == set(names) and len(names) == (14 if build is not tiny_gpt2 else 8)
    for name, m in names.items():
        assert get_mask(m) is not None, name
        assert abs(r.layers[name] - 0.5) < 1e-3, (name, r.layers[name])
    assert abs(r.sparsity - 0.5) < 1e-3
    torch.testing.assert_close(model.lm_head.weight, head)  # the LM head (and embeddings) stay dense
    logits = model(data[0]).logits
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    assert not torch.allclose(logits, dense_logits)
    if method != "magnitude":
        assert r.tokens == 3 * 4 * 16


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_decoder_2to4_pattern_holds(build):
    model = build()
    r = prune_decoder(model, "sparsegpt", nm=(2, 4), calib_data=calib())
    for name, m in decoder_linears(model).items():
        w = gemm_weight(m)  # GPT-2's Conv1D: the groups run along the input, its weight's first dimension
        assert nm_violations(w, 2, 4) == 0 and r.layers[name] == 0.5, name
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_each_block_is_calibrated_on_the_pruned_blocks_outputs():
    """Block 1's statistics must come from what PRUNED block 0 outputs (the error-correcting order of the papers):
    the inputs its layers saw during pruning equal those of the final model, not those of the dense one."""
    model, data = tiny_llama(), calib(2)
    dense = copy.deepcopy(model)
    q1 = decoder_blocks(model)[1][1].self_attn.q_proj
    seen: list[torch.Tensor] = []
    handle = q1.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    prune_decoder(model, "wanda", sparsity=0.6, calib_data=data)
    handle.remove()
    during = torch.cat(seen[:len(data)])  # the calibration pass over block 1 (before it was pruned)

    def block1_inputs(m: nn.Module) -> torch.Tensor:
        got: list[torch.Tensor] = []
        h = decoder_blocks(m)[1][1].self_attn.q_proj.register_forward_hook(lambda mm, a, o: got.append(a[0]))
        for ids in data:
            m(ids)
        h.remove()
        return torch.cat(got)

    torch.testing.assert_close(during, block1_inputs(model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(during, block1_inputs(dense), atol=1e-3)


def test_sequential_groups_layers_by_shared_input():
    from prunekit.pruning.llm.sparse import _input_groups, capture_block_inputs

    model, data = tiny_llama(), calib(1)
    captured, _ = capture_block_inputs(model, data, torch.device("cpu"))
    block = decoder_blocks(model)[1][0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    groups = [sorted(g) for g in _input_groups(block, layers, captured[0][0][0], captured[0])]
    assert groups == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    dense = copy.deepcopy(model)
    r = prune_decoder(model, "sparsegpt", sparsity=0.5, calib_data=calib(), sequential=True)
    assert abs(r.sparsity - 0.5) < 1e-3 and torch.isfinite(model(data[0]).logits).all()
    plain = copy.deepcopy(dense)
    prune_decoder(plain, "sparsegpt", sparsity=0.5, calib_data=calib())
    down = "model.layers.0.mlp.down_proj"  # calibrated on what the pruned gate/up give: a different result
    assert not torch.equal(decoder_linears(model)[down].weight, decoder_linears(plain)[down].weight)


def test_sparsify_api_and_registry():
    model, data = tiny_gpt2(), calib()
    rep = sparsify(model, "sparsegpt", 0.5, calib_data=data, example_inputs=data[0][:1])
    assert len(rep.layers) == 8 and abs(rep.sparsity - 0.5) < 1e-3
    assert {lr.type for lr in rep.layers} == {"Conv1D"} and "lm_head" in rep.skipped
    rep = sparsify(tiny_llama(), "wanda", calib_data=data)  # no sparsity: N:M by --nm, 2:4 by default
    assert rep.structure == "nm" and all(lr.nm_violations == 0 for lr in rep.layers)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_input_is_a_clear_error():
    model, data = tiny_llama(), calib(1)
    with pytest.raises(ConfigError, match=r"sparsity 1.0 must be in \[0, 1\)"):
        prune_decoder(model, "wanda", sparsity=1.0, calib_data=data)
    with pytest.raises(ConfigError, match="sparsity -0.1"):
        prune_decoder(model, "wanda", sparsity=-0.1, calib_data=data)
    with pytest.raises(ConfigError, match="0 < N < M"):
        prune_decoder(model, "wanda", nm=(4, 4), calib_data=data)
    with pytest.raises(ConfigError, match="not both"):
        prune_decoder(model, "wanda", sparsity=0.5, nm=(2, 4), calib_data=data)
    with pytest.raises(ConfigError, match="unknown method 'obs'.*magnitude, wanda, sparsegpt"):
        prune_decoder(model, "obs", sparsity=0.5)
    with pytest.raises(PruningError, match="needs calibration data"):
        prune_decoder(model, "sparsegpt", sparsity=0.5)
    with pytest.raises(PruningError, match="not.*lm_head"):
        prune_decoder(model, "wanda", sparsity=0.5, calib_data=data, layers={"lm_head": model.lm_head})
    with pytest.raises(ConfigError, match="--nm 2:4"):
        sparsify(model, "wanda", 0.5, nm="2:4", calib_data=data)
    with pytest.raises(ConfigError, match="nm"):
        sparsify(model, "wanda", nm="4:2", calib_data=data)
    with pytest.raises(PruningError, match="not .*transformers model"):
        prune_decoder(nn.Sequential(nn.Linear(4, 4)), "magnitude", sparsity=0.5)
    prune_decoder(model, "wanda", sparsity=0.5, calib_data=data)
    with pytest.raises(PruningError, match="already sparse"):
        prune_decoder(model, "wanda", sparsity=0.5, calib_data=data)


# ----------------------------------------------------------------------------------------------- CLI
def test_sparsify_cli_on_a_causal_lm_folder(tmp_path, capsys):
    """``prunekit sparsify`` on a save_pretrained folder: SparseGPT 2:4 from calibration text; the output reloads with
    plain from_pretrained, keeps the pattern and scores a finite perplexity; bad combinations are one clear error."""
    from prunekit.cli.main import main

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    text = tmp_path / "train.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 80)
    out = tmp_path / "sgpt24"
    args = ["sparsify", "--from", str(src), "--method", "sparsegpt", "--nm", "2:4", "--calib-text", str(text),
            "--eval-text", str(text), "--calib-samples", "8", "--seq-len", "32", "--batch-size", "4"]
    assert main([*args, "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["sparsity"] - 0.5) < 1e-6 and len(metrics["layers"]) == 14 and metrics["calib_tokens"] == 256
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "sparsity_report.json", "metrics.json"} <= written
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not any(n.endswith("weight_mask") for n, _ in model.named_buffers())
    for name, m in decoder_linears(model).items():
        assert nm_violations(m.weight, 2, 4) == 0 and float((m.weight == 0).float().mean()) == 0.5, name
    assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()
    # bad combinations: one message, exit code 2
    assert main(["sparsify", "--from", str(src), "--method", "l1", "--calib-text", str(text),
                 "--out", str(tmp_path / "x")]) == 2
    assert "wanda, sparsegpt" in capsys.readouterr().err
    assert main(["sparsify", "--from", str(src), "--method", "wanda", "--out", str(tmp_path / "x")]) == 2
    assert "--calib-text" in capsys.readouterr().err
    assert main([*args[:-6], "--sparsity", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err
