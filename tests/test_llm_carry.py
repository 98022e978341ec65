"""Width pruning measures each decoder layer on carried hidden states (prunekit.pruning.llm.carry): the same model
as the partial forward passes it replaces, at one layer call per step instead of O(layers^2)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import PruningError  # noqa: E402
from prunekit.pruning.llm import carry, prune_width  # noqa: E402
from prunekit.pruning.llm import width as width_mod  # noqa: E402

V, T, L = 64, 16, 4


def tiny(kind: str, layers: int = L):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=32)
    if kind == "llama":
        c = transformers.LlamaConfig(**common)
    elif kind == "qwen2-sliding":  # layers above max_window_layers get another mask: per-layer arguments matter
        c = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    else:
        c = transformers.GPT2Config(vocab_size=V, n_embd=32, n_inner=48, n_layer=layers, n_head=4, n_positions=32,
                                    bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def pruned(kind: str, monkeypatch, carried: bool, **opts):
    model = tiny(kind)
    with monkeypatch.context() as m:
        if not carried:
            m.setattr(width_mod, "affordable", lambda *a, **k: False)
        rep = prune_width(model, ids(), **opts)
    assert rep["calibration_pass"] == ("carried" if carried else "partial forwards (memory)")
    return model, rep


@pytest.mark.parametrize("kind,opts", [
    ("llama", dict(mlp_ratio=0.5, head_ratio=0.5, reconstruct_steps=4)),
    ("qwen2-sliding", dict(mlp_ratio=0.5, kv_ratio=0.5, reconstruct_steps=4)),
    ("gpt2", dict(mlp_ratio=0.5, reconstruct_steps=4)),
])
def test_carried_pass_gives_the_model_of_partial_passes(kind, opts, monkeypatch):
    a, ra = pruned(kind, monkeypatch, True, **opts)
    b, rb = pruned(kind, monkeypatch, False, **opts)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        torch.testing.assert_close(sa[k], sb[k], atol=2e-5, rtol=1e-4, msg=k)
    rec = [r for r in ra["layers"] if r["part"] == "reconstruct"]
    assert len(rec) == L and all(r["reconstruct_error_after"] <= r["reconstruct_error_before"] for r in rec)
    x = ids(4, seed=7)
    torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def mlp_calls(monkeypatch, carried: bool, layers: int) -> int:
    """How many times the decoder layers' MLPs run while pruning (the layers' real work)."""
    model = tiny("llama", layers)
    calls = {"n": 0}
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    with monkeypatch.context() as m:
        if not carried:
            m.setattr(width_mod, "affordable", lambda *a, **k: False)
        prune_width(model, ids(), mlp_ratio=0.5, head_ratio=0.5, reconstruct_steps=0, batch_size=8)
    return calls["n"]


def test_each_layer_runs_a_fixed_number_of_times(monkeypatch):
    batches, layers = 2, 8
    # carried: per layer, one run for the head statistics, one for the MLP's, one to feed the next layer
    assert mlp_calls(monkeypatch, True, layers) == layers * 3 * batches
    # two passes per layer, each cut inside layer l after running layers 0..l-1 whole: quadratic in the depth
    assert mlp_calls(monkeypatch, False, layers) == sum(2 * i for i in range(layers)) * batches


def test_split_call_names_positional_arguments():
    layer = tiny("gpt2").transformer.h[0]
    h, mask = torch.randn(1, T, 32), torch.zeros(1, 1, T, T)
    got_h, kw = carry.split_call(layer.forward, (h, None, mask), {"use_cache": False, "position_ids": None})
    assert got_h is not h and torch.equal(got_h, h)
    assert kw["attention_mask"] is mask and "cache" not in kw and "use_cache" not in kw


def test_unusual_models_fall_back_to_partial_passes(monkeypatch):
    def refuse(*_a, **_k):
        raise PruningError("this model does not pass a decoder layer's output on as it is")

    model = tiny("llama")
    monkeypatch.setattr(width_mod, "capture", refuse)
    rep = prune_width(model, ids(), mlp_ratio=0.5)
    assert rep["calibration_pass"] == "partial forwards"
    assert model.config.intermediate_size == 24
