"""LLM width criteria beyond the basics: ``fluctuation`` (FLAP) and ``obs`` (least-squares-aware greedy removal)."""

from __future__ import annotations

import pytest
import torch

from prunekit.pruning.llm.compensate import compensate
from prunekit.pruning.llm.criteria import Unit, get_criterion
from prunekit.pruning.structured.stats import _Accumulator

transformers = pytest.importorskip("transformers")


def _stats(h: torch.Tensor):
    acc = _Accumulator(h.shape[1], True, "h")
    acc.update(h, -1, None)
    return acc.result()


def _unit(h: torch.Tensor, W: torch.Tensor, *, centered: bool = False, keep: int | None = None) -> Unit:
    n = h.shape[1]
    ar = torch.arange(n).view(n, 1)
    return Unit([torch.zeros(n, 2)], [ar], W, ar, [None], _stats(h), 0, centered, keep)


def _lstsq_error(h: torch.Tensor, W: torch.Tensor, keep: torch.Tensor) -> float:
    """Output error of keeping ``keep`` with the least-squares refit (no intercept), as prune_width does it."""
    lin = torch.nn.Linear(h.shape[1], W.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(W)
    ref = h @ W.T
    compensate(lin, _stats(h), keep, "lstsq", bias=False, ridge=1e-6)
    return float((h[:, keep] @ lin.weight.detach()[:, keep].T - ref).square().mean())


def test_fluctuation_weighs_the_consumer_columns():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    W = torch.ones(5, 3, dtype=torch.float64)
    W[:, 0] = 10.0  # small variance, large weight: carries the most output energy
    s = get_criterion("fluctuation")(_unit(h, W, centered=True))
    assert int(s.argmax()) == 0 and int(s.argmin()) == 2
    assert int(get_criterion("variance")(_unit(h, W)).argmax()) == 1  # variance alone ranks by the input only
    # without an intercept the mean counts too: a constant channel carries energy no bias can restore
    h2 = h.clone()
    h2[:, 2] = 5.0
    assert float(get_criterion("fluctuation")(_unit(h2, W, centered=False))[2]) > float(
        get_criterion("fluctuation")(_unit(h2, W, centered=True))[2]) + 1.0


def test_obs_drops_what_the_kept_units_can_reproduce():
    g = torch.Generator().manual_seed(1)
    n = 8
    base = torch.randn(3000, n, generator=g, dtype=torch.float64)
    h = base.clone()
    h[:, 1] = 0.98 * base[:, 0] + 0.02 * base[:, 1]  # unit 1 is nearly a copy of unit 0
    h[:, 3] = 0.98 * base[:, 2] + 0.02 * base[:, 3]  # unit 3 nearly a copy of unit 2
    W = torch.randn(6, n, generator=g, dtype=torch.float64)
    W[:, [0, 1, 2, 3]] *= 3.0  # the copies carry the largest output energy: energy-only criteria keep them
    keep_n = 5
    chosen = {}
    for crit in ("obs", "fluctuation", "variance"):
        s = get_criterion(crit)(_unit(h, W, keep=keep_n))
        chosen[crit] = torch.topk(s, keep_n).indices.sort().values
    assert not {0, 1} <= set(chosen["obs"].tolist()) or not {2, 3} <= set(chosen["obs"].tolist())
    err = {k: _lstsq_error(h, W, v) for k, v in chosen.items()}
    assert err["obs"] < 0.5 * err["fluctuation"], err
    assert err["obs"] <= min(err.values())


def test_obs_group_units_score_whole_groups():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    h[:, 4:] = h[:, :2] + 0.01 * h[:, 4:]  # group 2 (columns 4, 5) copies group 0
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    W[:, 4:] *= 5.0
    mem = torch.arange(6).view(3, 2)
    u = Unit([torch.zeros(6, 2)], [mem], W, mem, [None], _stats(h), 0, False, 2)
    s = get_criterion("obs")(u)
    assert s.shape == (3,)
    assert int(s.argmin()) in (0, 2)  # one of the two copies goes first, not the independent group
    assert int(s.argmax()) == 1 or float(s[1]) > float(s.min())


def test_prune_width_with_new_criteria_reloads(tmp_path):
    from prunekit.pruning.llm import prune_width, save_pruned

    x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    for crit in ("obs", "fluctuation"):
        c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=16)
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(c).eval()
        rep = prune_width(m, x, mlp_ratio=0.5, head_ratio=0.5, criterion=crit, compensate="lstsq")
        assert rep["intermediate_size"] == [48, 24] and rep["kv_groups"][1] == 2
        save_pruned(m, tmp_path / crit)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / crit).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=x[:2]).logits, m(input_ids=x[:2]).logits)


def _qwen(nq: int = 8, nkv: int = 4):
    c = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=nq, num_key_value_heads=nkv, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def _kl_to(dense, x: torch.Tensor):
    """``kl(model)``: mean KL(dense || model) of the next-token distributions on ``x``."""
    with torch.no_grad():
        ref = torch.log_softmax(dense(input_ids=x).logits, -1)

    def kl(model) -> float:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x).logits, -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    return kl


def test_kv_merge_of_identical_groups_is_exact_and_reloads(tmp_path):
    from prunekit.pruning.llm import prune_width, save_pruned

    m = _qwen()
    with torch.no_grad():  # groups 0 and 2, 1 and 3 share their keys and values: merging them changes nothing
        for layer in m.model.layers:
            for p in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = p.weight.view(4, 4, 32)
                w[2], w[3] = w[0].clone(), w[1].clone()
                b = p.bias.view(4, 4)
                b[2], b[3] = b[0].clone(), b[1].clone()
    x = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=x[:3]).logits
    rep = prune_width(m, x, kv_ratio=0.5, reconstruct_steps=0)
    assert m.config.num_key_value_heads == 2 and m.config.num_attention_heads == 8
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    assert m.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    merged = [r for r in rep["layers"] if r["part"] == "kv"]
    assert [sorted(map(sorted, r["clusters"])) for r in merged] == [[[0, 2], [1, 3]]] * 2
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=x[:3]).logits, ref, atol=1e-4, rtol=1e-4)
    save_pruned(m, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x[:3]).logits, ref, atol=1e-4, rtol=1e-4)


def test_kv_merge_beats_plain_averaging():
    from prunekit.pruning.llm import prune_width

    x = torch.randint(0, 64, (48, 16), generator=torch.Generator().manual_seed(1))
    kl = _kl_to(_qwen(), x)

    merged = _qwen()
    rep = prune_width(merged, x, kv_ratio=0.5, reconstruct_steps=0)
    averaged = _qwen()  # the same clusters, plain mean of the key-value weights (the GQA paper's conversion)
    from prunekit.pruning.llm.kv_merge import _augmented, _set

    for layer, r in zip(averaged.model.layers, [r for r in rep["layers"] if r["part"] == "kv"]):
        a = layer.self_attn
        with torch.no_grad():
            for t in ("k_proj", "v_proj"):
                aug = list(_augmented(getattr(a, t)).split(4))
                _set(getattr(a, t), torch.cat([sum(aug[g] for g in c) / len(c) for c in r["clusters"]]))
            rows = torch.cat([torch.arange(i * 4, i * 4 + 4) for i in r["query_order"]])
            _set(a.q_proj, _augmented(a.q_proj)[rows])
            a.o_proj.weight.copy_(a.o_proj.weight[:, rows])
            a.num_key_value_groups = 4
    averaged.config.num_key_value_heads = 2
    assert kl(merged) < 0.97 * kl(averaged)


def test_kv_ratio_errors():
    from prunekit.errors import ConfigError
    from prunekit.pruning.llm import prune_width

    x = torch.randint(0, 64, (8, 16))
    with pytest.raises(ConfigError, match="kv_ratio=0.5 and head_ratio=0.5"):
        prune_width(_qwen(), x, kv_ratio=0.5, head_ratio=0.5)
    with pytest.raises(ConfigError, match="none can be merged away"):
        prune_width(_qwen(8, 1), x, kv_ratio=0.5)


def test_block_reconstruction_lowers_each_layers_error_and_the_kl():
    from prunekit.pruning.llm import prune_width

    x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(3))
    kl = _kl_to(_qwen(), x)

    plain, fitted = _qwen(), _qwen()
    prune_width(plain, x, head_ratio=0.5, mlp_ratio=0.5, criterion="variance", reconstruct_steps=0)
    rep = prune_width(fitted, x, head_ratio=0.5, mlp_ratio=0.5, criterion="variance", reconstruct_steps=30)
    recs = [r for r in rep["layers"] if r["part"] == "reconstruct"]
    assert len(recs) == 2 and all(r["reconstruct_error_after"] < r["reconstruct_error_before"] for r in recs)
    assert kl(fitted) < kl(plain)
    for a, b in zip(plain.model.layers, fitted.model.layers):  # only weight matrices move; norms stay
        torch.testing.assert_close(a.input_layernorm.weight, b.input_layernorm.weight)


def test_reconstruction_is_refused_when_streaming(tmp_path):
    from prunekit.errors import ConfigError
    from prunekit.pruning.llm.stream import prune_width_streaming

    m = _qwen()
    m.save_pretrained(tmp_path / "src")
    with pytest.raises(ConfigError, match="reconstruct_steps=5"):
        prune_width_streaming(tmp_path / "src", tmp_path / "out", torch.randint(0, 64, (4, 16)), mlp_ratio=0.5,
                              reconstruct_steps=5)


def test_reconstruction_auto_is_on_for_attention_only():
    from prunekit.pruning.llm.width import AUTO_RECONSTRUCT, WidthSettings

    assert WidthSettings(mlp_ratio=0.5).reconstruct() == 0
    assert WidthSettings(head_ratio=0.5).reconstruct() == AUTO_RECONSTRUCT
    assert WidthSettings(kv_ratio=0.5, reconstruct_steps=7).reconstruct() == 7
