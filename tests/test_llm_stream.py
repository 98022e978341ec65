"""Depth and Wanda / SparseGPT / magnitude pruning one decoder layer at a time from safetensors shards
(prunekit.pruning.llm.stream_depth, stream_sparse), against the in-memory functions on the same inputs."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunekit.errors import ConfigError, PruningError  # noqa: E402
from prunekit.pruning.llm import prune_decoder, prune_depth, prune_width, stream_depth, stream_sparse  # noqa: E402
from prunekit.pruning.llm.stream import prune_width_streaming  # noqa: E402
from prunekit.pruning.llm.stream_depth import prune_depth_streaming  # noqa: E402
from prunekit.pruning.llm.stream_io import ShardReader  # noqa: E402
from prunekit.pruning.llm.stream_sparse import sparsify_streaming  # noqa: E402
from prunekit.pruning.unstructured.masks import fold_masks  # noqa: E402

V, T = 64, 16


def tiny(kind: str = "llama", layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=32)
    if kind == "llama":
        c = transformers.LlamaConfig(**common)
    else:  # sliding-window layers above max_window_layers: two kinds of attention mask
        c = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    return transformers.AutoModelForCausalLM.from_config(c).eval()


def ids(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def load(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("method,opts", [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"nm": (2, 4)}),
                                         ("sparsegpt", {"sparsity": 0.6, "sequential": True}),
                                         ("magnitude", {"sparsity": 0.3})])
def test_sparsify_streaming_equals_prune_decoder(method, opts, tmp_path):
    tiny().save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    x = ids()
    rep = sparsify_streaming(tmp_path / "dense", tmp_path / "s", x, method, **opts)
    ref = load(tmp_path / "dense")
    r = prune_decoder(ref, method, calib_data=list(x.split(8)), **opts)
    fold_masks(ref)
    got = load(tmp_path / "s")  # plain transformers: dense storage, the zeros are the sparsity
    want = ref.state_dict()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert rep["sparsity"] == pytest.approx(r.sparsity) and rep["sparsity"] > 0.25
    assert rep["layers"] == pytest.approx(r.layers) and rep["max_resident_layers"] == 1
    assert not any("weight_mask" in k for k in ShardReader(tmp_path / "s").weight_map)


def test_sparsify_streaming_only_and_refusals(tmp_path):
    tiny().save_pretrained(tmp_path / "dense")
    rep = sparsify_streaming(tmp_path / "dense", tmp_path / "s", ids(4), "wanda", sparsity=0.5, only=["mlp"])
    assert rep["layers"] and all(".mlp." in n for n in rep["layers"])
    dense, got = load(tmp_path / "dense"), load(tmp_path / "s")
    q = [m.model.layers[1].self_attn.q_proj.weight for m in (got, dense)]
    torch.testing.assert_close(*q)  # attention left dense
    assert float((got.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(PruningError, match="needs calibration data"):
        sparsify_streaming(tmp_path / "dense", tmp_path / "w", None, "sparsegpt", sparsity=0.5)
    with pytest.raises(ConfigError, match="is the source folder"):
        sparsify_streaming(tmp_path / "dense", tmp_path / "dense", ids(4), "wanda", sparsity=0.5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_depth_streaming_equals_prune_depth(kind, tmp_path):
    tiny(kind, layers=5).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    x = ids()
    rep = prune_depth_streaming(tmp_path / "dense", tmp_path / "d", x, drop_layers=2)
    ref = load(tmp_path / "dense")
    r = prune_depth(ref, x, drop_layers=2)
    assert rep["dropped"] == r["dropped"] and rep["scores"] == r["scores"] and rep["max_resident_layers"] == 1
    assert rep["params_after"] == r["params_after"] and rep["config_changes"] == r["config_changes"]
    got = load(tmp_path / "d")
    torch.testing.assert_close(got(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    if kind == "qwen2":  # the per-layer lists follow the kept layers
        assert cfg["layer_types"] == ref.config.layer_types and cfg["max_window_layers"] == ref.config.max_window_layers


def test_depth_streaming_refuses_the_loss_criterion_and_bad_counts(tmp_path):
    tiny().save_pretrained(tmp_path / "dense")
    with pytest.raises(ConfigError, match="depth_criterion='loss'.*valid here: angular"):
        prune_depth_streaming(tmp_path / "dense", tmp_path / "d", ids(4), drop_layers=1, depth_criterion="loss")
    with pytest.raises(ConfigError, match="remove 3 of 3"):
        prune_depth_streaming(tmp_path / "dense", tmp_path / "d", ids(4), drop_layers=3)


def test_width_streaming_gives_sliding_layers_their_own_mask(tmp_path):
    """Qwen2 sliding-window layers get another attention mask than layer 0: each layer is run with its own."""
    tiny("qwen2").save_pretrained(tmp_path / "dense")
    x = ids()
    prune_width_streaming(tmp_path / "dense", tmp_path / "w", x, mlp_ratio=0.5, criterion="wanda", compensate="lstsq")
    ref = load(tmp_path / "dense")
    prune_width(ref, x, mlp_ratio=0.5, criterion="wanda", compensate="lstsq")
    torch.testing.assert_close(load(tmp_path / "w")(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)


class _Watch:
    """Spies on the streaming code: the most decoder layers resident (not on meta) right after each layer is read,
    and the layers each shard read touches."""

    def __init__(self, monkeypatch, module):
        self.most, self.reads = 0, []
        real_mat, real_load = module._materialize, ShardReader.load

        def materialize(lm, prefix, reader, dtype, device):
            m = real_mat(lm, prefix, reader, dtype, device)
            resident = sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in lm.model.layers)
            self.most = max(self.most, resident)
            return m

        def read(reader, names, dtype=None):
            self.reads.append(sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}))
            return real_load(reader, names, dtype)

        monkeypatch.setattr(module, "_materialize", materialize)
        monkeypatch.setattr(ShardReader, "load", read)


@pytest.mark.parametrize("run", ["sparsegpt", "depth"])
def test_at_most_one_decoder_layer_is_materialized(run, tmp_path, monkeypatch):
    tiny(layers=4).save_pretrained(tmp_path / "dense", max_shard_size="20KB")
    watch = _Watch(monkeypatch, stream_sparse if run == "sparsegpt" else stream_depth)
    if run == "sparsegpt":
        rep = sparsify_streaming(tmp_path / "dense", tmp_path / "o", ids(4), "sparsegpt", sparsity=0.5)
    else:
        rep = prune_depth_streaming(tmp_path / "dense", tmp_path / "o", ids(4), drop_layers=1)
    assert watch.most == 1 and rep["max_resident_layers"] == 1
    layer_reads = [r for r in watch.reads if r]
    assert all(len(r) == 1 for r in layer_reads)  # every shard read holds one layer at most
    assert layer_reads[:4] == [[0], [1], [2], [3]]  # the (scoring / pruning) pass, in order
    if run == "depth":  # then the kept layers are copied, one at a time
        assert layer_reads[4:] == [[i] for i in range(4) if i not in rep["dropped"]]
