"""Width pruning adds no bias to a Llama / Mistral / Qwen2 by default, keeps the config's other keys and
``architectures``, and refuses to write a model its config cannot describe (prunekit.pruning.llm.layout)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError, PruningError  # noqa: E402
from prunekit.pruning.llm import prune_width, save_pruned  # noqa: E402
from prunekit.pruning.llm.arch import keep_in, keep_out  # noqa: E402
from prunekit.pruning.llm.layout import WIDTH_KEYS, config_changes, config_snapshot  # noqa: E402

V, T = 64, 16
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}


def tiny(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    c = CONFIGS[kind](vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=T, **kw)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def bias_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith("bias")}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_compensated_model_keeps_its_architecture_and_reloads(kind, tmp_path):
    tiny(kind).save_pretrained(tmp_path / "dense")  # a folder as users have them: architectures written
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    dense_cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    biases = bias_names(model)
    flags = (getattr(model.config, "attention_bias", None), getattr(model.config, "mlp_bias", None))
    x = ids()
    rep = prune_width(model, x, mlp_ratio=0.5, head_ratio=0.5, compensate="lstsq")
    assert (getattr(model.config, "attention_bias", None), getattr(model.config, "mlp_bias", None)) == flags
    assert bias_names(model) == biases  # no new bias parameter anywhere
    assert rep["biases_added"] == [] and rep["intercept_lost_max"] > 0  # what an intercept would have restored
    assert set(rep["config_changes"]) <= WIDTH_KEYS and "intermediate_size" in rep["config_changes"]
    logits = model(input_ids=x).logits
    save_pruned(model, tmp_path / "pruned", rep)
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["architectures"] == dense_cfg["architectures"] == [type(model).__name__]
    assert set(cfg) - {"head_dim"} == set(dense_cfg) - {"head_dim"}  # no key added or dropped
    changed = {k for k in cfg if cfg[k] != dense_cfg.get(k)} - {"transformers_version"}
    assert changed <= WIDTH_KEYS, changed
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert bias_names(again) == biases
    torch.testing.assert_close(again(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)


def _consumer_outputs(model: torch.nn.Module, x: torch.Tensor, part: str) -> torch.Tensor:
    outs = []
    hooks = [(layer.mlp.down_proj if part == "mlp" else layer.self_attn.o_proj).register_forward_hook(
        lambda _m, _a, out: outs.append(out.detach().reshape(-1, out.shape[-1]))) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    return torch.cat(outs).double()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("part", ["mlp", "heads"])
def test_lstsq_without_intercept_beats_no_compensation(kind, part):
    x = ids()
    dense = _consumer_outputs(tiny(kind), x, part)
    ratio = {"mlp_ratio": 0.5} if part == "mlp" else {"head_ratio": 0.5}
    err = {}
    for comp in ("none", "lstsq"):
        m = tiny(kind)
        prune_width(m, x, criterion="magnitude", compensate=comp, sequential=False, reconstruct_steps=0, **ratio)
        err[comp] = (_consumer_outputs(m, x, part) - dense).square().mean().item()
    assert err["lstsq"] < 0.9 * err["none"], err


def test_an_intercept_helps_only_when_asked_for():
    """add_bias=True (opt-in) fits the intercept too: never worse on calibration, and it changes the config."""
    x = ids()
    dense = _consumer_outputs(tiny("llama"), x, "mlp")
    err = {}
    for add in (False, True):
        m = tiny("llama")
        rep = prune_width(m, x, mlp_ratio=0.5, criterion="magnitude", compensate="lstsq", add_bias=add)
        err[add] = (_consumer_outputs(m, x, "mlp") - dense).square().mean().item()
        assert (m.config.mlp_bias, rep["biases_added"]) == ((True, ["mlp_bias"]) if add else (False, []))
    assert err[True] <= err[False] * 1.001


def test_mean_and_add_bias_are_refused_where_they_would_change_the_architecture():
    x = ids(16)
    m = tiny("llama")
    w = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    with pytest.raises(PruningError, match=r"add_bias=True \(--add-bias\) switches on mlp_bias"):
        prune_width(m, x, mlp_ratio=0.5, compensate="mean")
    torch.testing.assert_close(m.model.layers[0].mlp.down_proj.weight, w)  # refused before any change
    assert m.config.mlp_bias is False and m.model.layers[0].mlp.down_proj.bias is None
    for kind in ("mistral", "qwen2"):
        with pytest.raises(ConfigError, match=f"add_bias=True: a {kind} config cannot express a bias on down_proj"):
            prune_width(tiny(kind), x, mlp_ratio=0.5, add_bias=True)


def test_per_layer_widths_are_refused_with_the_reason_and_nothing_is_written(tmp_path):
    m = tiny("llama")
    mlp = m.model.layers[1].mlp  # layer 1 alone at 40 channels: no LlamaConfig can say that
    keep = torch.arange(40)
    keep_out(mlp.gate_proj, keep), keep_out(mlp.up_proj, keep), keep_in(mlp.down_proj, keep)
    with pytest.raises(PruningError, match=r"model.layers.1.mlp.gate_proj.weight has shape \[40, 32\] but the "
                                           r"config builds \[48, 32\].*one intermediate_size"):
        save_pruned(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    b = tiny("llama")
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(32))  # one layer's bias only
    with pytest.raises(PruningError, match="down_proj.bias exists in the model but not in what the config builds"):
        save_pruned(b, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_change_outside_the_widths_is_refused():
    m = tiny("qwen2")
    before = config_snapshot(m.config)
    m.config.intermediate_size = 24
    assert config_changes(before, m.config, WIDTH_KEYS) == {"intermediate_size": [48, 24]}
    m.config.rms_norm_eps = 1e-3
    with pytest.raises(PruningError, match="changed the config key 'rms_norm_eps'"):
        config_changes(before, m.config, WIDTH_KEYS)
