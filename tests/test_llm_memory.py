"""Width pruning one decoder layer at a time from safetensors shards (prunekit.pruning.llm.stream)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError  # noqa: E402
from prunekit.pruning.llm import prune_width, save_pruned  # noqa: E402
from prunekit.pruning.llm.stream import ShardReader, prune_width_streaming  # noqa: E402

V, T = 64, 16


def tiny(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    cls = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    c = cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=32)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_streaming_equals_the_in_memory_pruning_and_holds_one_layer(kind, tmp_path):
    tiny(kind).save_pretrained(tmp_path / "dense", max_shard_size="20KB")  # several shards
    assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    x = ids()
    settings = {"mlp_ratio": 0.5, "head_ratio": 0.5, "criterion": "wanda", "compensate": "lstsq"}
    rep = prune_width_streaming(tmp_path / "dense", tmp_path / "stream", x, **settings)
    assert rep["max_resident_layers"] == 1 and rep["layers_read"] == [0, 1, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    prune_width(model, x, **settings, reconstruct_steps=0)  # sequential: the same statistics; streaming: no refit
    streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    torch.testing.assert_close(streamed(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"]) == (24, 2)
    save_pruned(model, tmp_path / "memory")
    assert json.loads((tmp_path / "memory" / "config.json").read_text())["intermediate_size"] == 24


def test_the_reader_reads_one_layer_at_a_time_in_order(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    order: list[set[str]] = []
    real = ShardReader.load

    def spy(self, names, dtype=None):
        order.append({n.split(".")[2] if n.startswith("model.layers.") else "rest" for n in names})
        return real(self, names, dtype)

    monkeypatch.setattr(ShardReader, "load", spy)
    prune_width_streaming(tmp_path / "dense", tmp_path / "out", ids(4), mlp_ratio=0.5, compensate="none")
    assert order[1:4] == [{"0"}, {"1"}, {"2"}]  # after the embedding: each call one layer, in order
    assert order[0] == {"rest"} and all(o == {"rest"} for o in order[4:])


def test_streaming_refuses_what_needs_every_layer_at_once(tmp_path):
    tiny().save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="hidden_ratio and add_bias"):
        prune_width_streaming(tmp_path / "dense", tmp_path / "o", ids(4), hidden_ratio=0.25)
    with pytest.raises(ConfigError, match="is the source folder"):
        prune_width_streaming(tmp_path / "dense", tmp_path / "dense", ids(4), mlp_ratio=0.5)
