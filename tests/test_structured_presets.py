"""Presets select exactly the intended layers; attention heads; transformer families prune and still run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PruningError
from prunekit.pruning import prune
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import PruneSettings


def empty(build) -> nn.Module:
    """Build on the meta device, then allocate without initialising (fast; values are irrelevant to the graph)."""
    with torch.device("meta"):
        m = build()
    return m.to_empty(device="cpu").eval()


def selected(model: nn.Module, x, **settings) -> set[str]:
    units = plan_units(PruningGraph(model, x), PruneSettings.build(settings))
    return {n for u in units for n in u.layers}


def test_interior_on_torchvision_resnet50():
    tv = pytest.importorskip("torchvision")
    got = selected(empty(lambda: tv.models.resnet50(num_classes=10)), torch.randn(1, 3, 32, 32), preset="interior")
    blocks = [f"layer{i}.{j}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for j in range(n)]
    assert got == {f"{b}.conv{k}" for b in blocks for k in (1, 2)}  # never conv3, downsample, stem conv1 or fc


def test_interior_on_torchvision_mobilenetv2():
    tv = pytest.importorskip("torchvision")
    got = selected(empty(lambda: tv.models.mobilenet_v2(num_classes=10)), torch.randn(1, 3, 32, 32),
                   preset="interior")
    # expand 1x1 + depthwise 3x3 of every block with an expansion (features.2 .. features.17), never the projection
    assert got == {f"features.{i}.conv.{k}.0" for i in range(2, 18) for k in (0, 1)}


def test_interior_without_repeated_blocks_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(PruningError, match="no repeated blocks"):
        selected(model, torch.randn(1, 3, 8, 8), preset="interior")


def test_mlp_only_on_timm_vit_b():
    timm = pytest.importorskip("timm")
    model = empty(lambda: timm.create_model("vit_base_patch16_224", img_size=32, num_classes=10))
    got = selected(model, torch.randn(1, 3, 32, 32), preset="mlp-only")
    assert got == {f"blocks.{i}.mlp.fc1" for i in range(12)}
    heads = selected(model, torch.randn(1, 3, 32, 32), preset="mlp-only", heads=True)
    assert heads - got == {f"blocks.{i}.attn.qkv" for i in range(12)}


def hf_model(kind: str, task: str = "sequence-classification", layers: int = 2):
    pytest.importorskip("transformers")
    cfg = {"model_type": kind, "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100}
    if kind == "llama":
        cfg.update(num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = prunekit.create_model(f"hf:tiny-{kind}", hf_config=cfg, task=task, num_classes=3).eval()
    return model, prunekit.runs.example_inputs(model.prunekit_spec, 2)


def test_mlp_only_on_hf_bert_prunes_only_the_intermediate_layers():
    model, x = hf_model("bert")
    enc = "model.bert.encoder.layer"
    assert selected(model, x, preset="mlp-only") == {f"{enc}.{i}.intermediate.dense" for i in range(2)}
    before = {k: v.shape for k, v in model.state_dict().items()}
    report = prune(model, x, ratio=0.5, preset="mlp-only", scope="local")
    after = {k: v.shape for k, v in model.state_dict().items()}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {f"{enc}.{i}.{p}" for i in range(2) for p in
                       ("intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight")}
    assert report.layers == {f"{enc}.{i}.intermediate.dense": [64, 32] for i in range(2)}
    assert model(**x).shape == (2, 3)


def test_mlp_only_on_llama_prunes_gate_and_up_into_down():
    model, x = hf_model("llama")
    layers = "model.model.layers"
    assert selected(model, x, preset="mlp-only") == {f"{layers}.{i}.mlp.{p}" for i in range(2)
                                                     for p in ("gate_proj", "up_proj")}
    attn_before = copy.deepcopy(model.model.model.layers[0].self_attn.state_dict())
    prune(model, x, ratio=0.5, preset="mlp-only", scope="local")
    for i in range(2):
        mlp = model.model.model.layers[i].mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 32
        assert mlp.down_proj.out_features == 32  # the residual stream is untouched
    for k, v in model.model.model.layers[0].self_attn.state_dict().items():
        torch.testing.assert_close(v, attn_before[k], rtol=0, atol=0)
    assert model(**x).shape == (2, 3)


def test_llama_heads_are_refused_with_a_reason():
    model, x = hf_model("llama", layers=1)
    with pytest.raises(PruningError, match="rotary"):
        prune(model, x, heads=True, preset="mlp-only")


def test_bert_head_pruning_updates_attributes_and_matches_the_masked_model():
    model, x = hf_model("bert", task="feature-extraction")
    model = model.double()
    pruned = copy.deepcopy(model)
    report = prune(pruned, x, ratio=0.5, heads=True, preset="mlp-only")
    masked = copy.deepcopy(model)
    for i in range(2):
        att = pruned.model.encoder.layer[i].attention.self
        assert att.num_attention_heads == 2 and att.all_head_size == 16 and att.query.out_features == 16
        rec = next(g for g in report.groups if g.heads_before and f"layer.{i}." in g.name)
        masked.model.encoder.layer[i].attention.output.dense.weight.data[:, rec.removed] = 0
        mlp = next(g for g in report.groups if g.name.endswith(f"layer.{i}.intermediate.dense"))
        masked.model.encoder.layer[i].output.dense.weight.data[:, mlp.removed] = 0
    torch.testing.assert_close(pruned(**x), masked(**x), rtol=1e-10, atol=1e-12)
