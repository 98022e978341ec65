"""The one entry shape: ``prunekit.prune(model, example_inputs, config, calib_data=...)`` for every family, configs in
sections with generated flat keys, and transactional calls (a failure leaves the model exactly as it was)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.structured import StructuredConfig, Target
from prunekit.pruning.transaction import ModelSnapshot, transaction


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor], modules: list[nn.Module]) -> None:
    """Same module objects, same keys, bit-identical tensors."""
    assert list(model.modules()) == modules
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


class Attn(nn.Module):
    """A user's attention whose reshape uses the input width: torch-pruning cannot map the residual stream."""

    def __init__(self, d: int = 64, h: int = 4):
        super().__init__()
        self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.att = nn.Linear(16, 64), Attn()
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.emb(x)
        x = x + self.att(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("criterion", ["l1", "variance"])
def test_groups_torch_pruning_cannot_map_are_left_whole_and_the_model_runs(criterion):
    """The issue's case: pruning the residual stream breaks the reshape. That group is left whole (named in the
    report), the MLP is pruned, and the model runs; on main the call raised after pruning `emb` to 58 outputs."""
    torch.manual_seed(0)
    model, x = TinyTransformer().eval(), torch.randn(1, 8, 16)
    calib = [torch.randn(4, 8, 16) for _ in range(3)]
    report = prunekit.prune(model, x, criterion, ratio=0.3, calib_data=calib if criterion == "variance" else None)
    assert model(x).shape == (1, 10)
    assert model.emb.out_features == 64 and model.mlp[0].out_features < 128
    assert report.left_whole and any("forward" in why or "scored" in why for why in report.left_whole.values())


def test_a_failed_call_restores_the_model_bit_for_bit(monkeypatch):
    """A failure after groups were pruned (here: in BatchNorm re-estimation, the step after `apply`) restores the
    same module objects and a bit-identical state dict, and is one typed error saying so."""
    from prunekit.pruning.structured import bn

    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", in_channels=1, num_classes=10).eval()
    before, modules = _state(model), list(model.modules())
    calib = [torch.randn(8, 1, 16, 16) for _ in range(2)]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bn, "recalibrate_after_pruning", boom)
    with pytest.raises(PruningError, match=r"rolled back, the model is unchanged: RuntimeError: disk full"):
        prunekit.prune(model, torch.randn(1, 1, 16, 16), "variance", target_macs=0.5, calib_data=calib)
    _same(model, before, modules)
    assert model.conv1.out_channels == 16 and not model.conv1._forward_hooks


def test_a_prunekit_error_keeps_its_type_and_says_the_model_is_unchanged(monkeypatch):
    from prunekit.pruning.structured import bn

    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10).eval()
    before, modules = _state(model), list(model.modules())

    def refuse(*a, **k):
        raise PruningError("recalibrate_bn got no batches")

    monkeypatch.setattr(bn, "recalibrate_after_pruning", refuse)
    with pytest.raises(PruningError, match=r"got no batches \(the model is unchanged\)"):
        prunekit.prune(model, torch.randn(1, 1, 8, 8), "l1", ratio=0.5)
    _same(model, before, modules)


def test_snapshot_restores_replaced_parameters_new_attributes_and_hooks():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    before, modules = _state(m), list(m.modules())
    snap = ModelSnapshot(m)
    m[0].weight = nn.Parameter(torch.zeros(3, 4))  # torch-pruning replaces parameters
    m[0].out_features = 3
    m[2].bias.data.add_(1.0)  # compensation changes tensors in place
    m[2].extra = "added"
    m[1].register_forward_hook(lambda *a: None)
    m[1] = nn.Identity()  # a child replaced
    snap.restore()
    _same(m, before, modules)
    assert m[0].out_features == 6 and not hasattr(m[2], "extra") and not m[1]._forward_hooks


def test_transaction_turns_a_raw_error_into_a_pruning_error_chained_to_it():
    m = nn.Linear(3, 3)
    w = m.weight.detach().clone()
    with pytest.raises(PruningError) as info, transaction(m, "test"):
        m.weight.data.mul_(0)
        raise KeyError("x")
    assert isinstance(info.value.__cause__, KeyError) and torch.equal(m.weight, w)


# ------------------------------------------------------------------------------------------- one config shape
def test_flat_keys_nested_sections_and_python_objects_are_one_config():
    flat = StructuredConfig.build({"criterion": "variance", "target_macs": 0.5, "compensate": "lstsq",
                                   "reconstruct_steps": 8, "calib_batches": 4, "round_to": 8})
    nested = StructuredConfig.build({"criterion": "variance", "target": {"macs": 0.5},
                                     "compensation": {"mode": "lstsq"}, "reconstruction": {"steps": 8},
                                     "calibration": {"batches": 4}, "layers": {"round_to": 8}})
    objects = StructuredConfig(criterion="variance", target=Target(macs=0.5),
                               compensation={"mode": "lstsq"}, reconstruction={"steps": 8},
                               calibration={"batches": 4}, layers={"round_to": 8})
    assert flat == nested == objects
    assert StructuredConfig.build(flat.to_dict()) == flat  # the flat JSON form round-trips (config.yaml)
    assert flat.flat()["reconstruct_steps"] == 8 and flat.reconstruction.steps == 8


@pytest.mark.parametrize("values, match", [
    ({"ratio": 0.3, "target_macs": 0.5}, r"both `ratio` \(0.3\) and `target_macs` \(0.5\)"),
    ({"round_to": 8, "round_to_wide": 12}, r"`round_to_wide` \(12\) must be a multiple of `round_to` \(8\)"),
    ({"reconstruct_lr": 0.1, "reconstruct_input_mix": 0.5}, r"reconstruct_input_mix=0.5 shapes the reconstruction"),
    ({"target_latency": 0.5, "scope": "adaptive"}, r"target_latency.*not 'adaptive'"),
    ({"critrion": "l1"}, r"unknown key 'critrion'; did you mean 'criterion'"),
    ({"criterion": "atuo"}, r"unknown criterion 'atuo'; did you mean 'auto'\?.*Valid criterion names: auto, bn_scale"),
    ({"compensate": "lsq"}, r"'compensate' = 'lsq' is invalid.*'auto', 'none', 'mean' or 'lstsq'"),
])
def test_invalid_combinations_are_refused_at_construction_naming_the_fields(values, match):
    with pytest.raises(ConfigError, match=match):
        StructuredConfig.build(values)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="both `ratio`.*`target_macs`"):
        StructuredConfig(target=Target(ratio=0.3, macs=0.5))


def test_every_default_lives_in_one_place():
    """The CLI stage, the Python shortcut and the config agree: the stage composes the config, it has no copies."""
    from prunekit.pipeline.prune import PruneConfig

    stage = PruneConfig.build({"from": "runs/x"})
    assert stage.prune == StructuredConfig()
    assert set(StructuredConfig.keys()) <= set(PruneConfig.keys())
    assert "recalibrate_bn" not in PruneConfig.model_fields  # no stage-level override of the default


def test_keyword_shortcuts_are_generated_from_the_config():
    for key in StructuredConfig.keys():
        assert f"``{key}``" in prunekit.prune.__doc__
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    with pytest.raises(ConfigError, match="unknown key 'retio'; did you mean 'ratio'"):
        prunekit.prune(model, torch.randn(1, 1, 8, 8), retio=0.5)


def test_a_config_object_and_keywords_together():
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    cfg = StructuredConfig(criterion="l2", target=Target(ratio=0.5))
    report = prunekit.prune(model, torch.randn(1, 1, 8, 8), cfg, ratio=0.25, recalibrate_bn=False)
    assert report.criterion == "l2" and report.ratio == pytest.approx(0.25)
    assert cfg.target.ratio == 0.5  # the caller's object is not changed


def test_defaults_are_variance_and_lstsq_with_data_l2_and_none_without():
    """The defaults chosen by benchmarks/defaults.py (docs/defaults.md): with calibration data and nothing else, the
    best measured path (variance + least-squares refit + BatchNorm re-estimation); without data, l2 alone."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    with_data = prunekit.prune(prunekit.create_model("smallcnn", in_channels=1, num_classes=10), x, ratio=0.3,
                               calib_data=[torch.randn(16, 1, 8, 8) for _ in range(2)])
    without = prunekit.prune(prunekit.create_model("smallcnn", in_channels=1, num_classes=10), x, ratio=0.3)
    assert (with_data.criterion, with_data.compensate) == ("variance", "lstsq") and with_data.compensation
    assert with_data.bn_recalibration.get("batches") == 2
    assert (without.criterion, without.compensate) == ("l2", "none") and not without.compensation
    assert StructuredConfig().criterion == "auto" and StructuredConfig().compensation.mode == "auto"


# ------------------------------------------------------------------------------------------- other families
def test_sparsity_config_through_the_one_entry():
    torch.manual_seed(0)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    report = prunekit.prune(model, torch.randn(1, 1, 8, 8), prunekit.SparsityConfig(method="l1", sparsity=0.5))
    assert type(report).__name__ == "SparsityReport"
    w = model.features[3].weight  # an inner conv (the first layer and the classifier stay dense)
    assert isinstance(model.features[3], nn.Conv2d) and 0.4 < float((w == 0).float().mean()) < 0.6


def test_a_failed_sparsity_call_leaves_the_model_as_it_was(monkeypatch):
    """A failure after the masks were applied (in the report) removes the masks and restores the weights."""
    from prunekit.pruning.unstructured.sparsifier import Sparsifier

    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    before, modules = _state(model), list(model.modules())

    def broken_report(self):
        raise RuntimeError("report failed")

    monkeypatch.setattr(Sparsifier, "report", broken_report)
    with pytest.raises(PruningError, match="rolled back.*report failed"):
        prunekit.prune(model, torch.randn(1, 1, 8, 8), prunekit.SparsityConfig(method="l1", sparsity=0.5))
    _same(model, before, modules)
    assert not any("weight_mask" in k for k in model.state_dict())


def test_width_config_through_the_one_entry_and_rolled_back_on_failure(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=16)
    model = transformers.AutoModelForCausalLM.from_config(c).eval()
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    pruned = copy.deepcopy(model)
    prunekit.prune(pruned, None, prunekit.WidthConfig(mlp_ratio=0.5), calib_data=ids)
    assert pruned.model.layers[0].mlp.gate_proj.out_features == 24

    from prunekit.pruning.llm import width

    before, modules = _state(model), list(model.modules())
    real, calls = width._Pruner._prune_mlp, {"n": 0}

    def second_layer_fails(self, *a, **k):  # the first layer is pruned for real, then the call fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(self, *a, **k)

    monkeypatch.setattr(width._Pruner, "_prune_mlp", second_layer_fails)
    with pytest.raises(PruningError, match="rolled back.*out of memory"):
        prunekit.prune(model, None, prunekit.WidthConfig(mlp_ratio=0.5), calib_data=ids)
    assert calls["n"] == 2
    _same(model, before, modules)
    assert model.config.intermediate_size == 48


def test_an_unknown_config_type_is_refused():
    with pytest.raises(ConfigError, match="config must be one of StructuredConfig"):
        prunekit.prune(nn.Linear(2, 2), torch.randn(1, 2), config=3.5)


class UNet(nn.Module):
    """A plain U-Net: concatenation skip, ConvTranspose2d up-sampling (k = stride = 2: every output position reads
    exactly one kernel tap, so mean compensation keeps the up-sampler's mean output exactly)."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.e2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.e1(x)
        return self.out(self.d1(torch.cat([a, self.up(self.e2(a))], 1)))


def _up_mean(model: UNet, batches: list[torch.Tensor]) -> torch.Tensor:
    outs = []
    h = model.up.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(outs).double().mean((0, 2, 3))


@pytest.mark.parametrize("mode", ["mean", "lstsq"])
def test_conv_transpose_consumers_are_compensated(mode):
    """On main, compensate='mean'/'lstsq' refused the whole U-Net ("no layer consuming the channels removed from
    'e2.1' can be compensated"). Now the ConvTranspose2d reading them gets mean compensation (lstsq falls back to
    it there) and keeps its mean output."""
    torch.manual_seed(0)
    model = UNet().eval()
    batches = [torch.randn(8, 1, 16, 16) for _ in range(4)]
    dense_mean = _up_mean(model, batches)
    plain = copy.deepcopy(model)
    prunekit.prune(plain, batches[0][:1], "l1", ratio=0.5, only="e2.1", compensate="none")
    report = prunekit.prune(model, batches[0][:1], "l1", ratio=0.5, only="e2.1", calib_data=batches,
                            compensate=mode)
    assert model.up.in_channels == 8 and model(batches[0]).shape == (8, 2, 16, 16)
    assert [(c["name"], c["mode"]) for c in report.compensation] == [("up", "mean")]
    torch.testing.assert_close(_up_mean(model, batches), dense_mean, rtol=0, atol=1e-5)
    assert (_up_mean(plain, batches) - dense_mean).abs().max() > 1e-2  # without it the mean moves


def test_llm_width_speaks_of_ratios_and_reads_the_old_names_with_a_warning(caplog):
    """``mlp_sparsity`` meant a fraction of channels removed, what ``ratio`` means everywhere else: renamed."""
    import argparse

    from prunekit.cli.args import add_config_arguments, resolve_config

    cfg = prunekit.WidthConfig.build({"mlp_sparsity": 0.5, "head_ratio": 0.25})
    assert (cfg.mlp_ratio, cfg.head_ratio) == (0.5, 0.25)
    assert "'mlp_sparsity' is renamed 'mlp_ratio'" in caplog.text
    with pytest.raises(ConfigError, match="old name of 'mlp_ratio'"):
        prunekit.WidthConfig.build({"mlp_sparsity": 0.5, "mlp_ratio": 0.5})
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, prunekit.WidthConfig)
    assert resolve_config(prunekit.WidthConfig, parser.parse_args(["--mlp-sparsity", "0.3"])).mlp_ratio == 0.3
    assert "--mlp-sparsity" not in parser.format_help() and "--mlp-ratio" in parser.format_help()


def test_wanda_through_the_one_entry_and_rolled_back_on_failure(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from prunekit.pruning.llm import sparse

    torch.manual_seed(0)
    c = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.AutoModelForCausalLM.from_config(c).eval()
    batches = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before, modules = _state(model), list(model.modules())
    cfg = prunekit.SparsityConfig(method="wanda", sparsity=0.5)
    real, calls = sparse._prune_layer, {"n": 0}

    def fails_later(*a, **k):  # several layers are sparsified for real, then the call fails
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(sparse, "_prune_layer", fails_later)
    with pytest.raises(PruningError, match="rolled back.*interrupted"):
        prunekit.prune(model, None, cfg, calib_data=batches)
    _same(model, before, modules)
    monkeypatch.setattr(sparse, "_prune_layer", real)
    prunekit.prune(model, None, cfg, calib_data=batches)
    w = model.model.layers[1].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_stage_configs_compose_sections_instead_of_inheriting_option_groups():
    """Every command's config is a plain Config whose option groups are sections (fields), not base classes; the
    flags are the sections' flat keys and a stage's own section defaults show in --help."""
    import prunekit.cli.main  # noqa: F401  (registers every command)
    from prunekit.config import Config
    from prunekit.pipeline.commands import COMMANDS
    from prunekit.pipeline.stages import FinetuneConfig, TrainConfig

    for name in COMMANDS.names():
        cls = COMMANDS.get(name).config
        mixins = [b.__name__ for b in cls.__mro__[1:] if isinstance(b, type) and issubclass(b, Config)
                  and b is not Config]
        assert not mixins, (name, mixins)
    ft = FinetuneConfig.build({"from": "runs/x"})
    assert (ft.train.epochs, ft.train.lr) == (5, 0.01) and TrainConfig.build({}).train.epochs == 10
    assert FinetuneConfig(**{"from": "runs/x", "epochs": 2}).train.epochs == 2
    assert FinetuneConfig.flat_defaults()["epochs"] == 5 and "epochs" in FinetuneConfig.keys()
    assert FinetuneConfig.build(ft.to_dict()) == ft  # the flat config.yaml form reads back


def test_the_family_functions_are_transactional_too_and_nested_calls_snapshot_once(monkeypatch):
    """``sparsify()``, ``prune_width()``, ... called directly are all or nothing as well; through ``prune()`` the
    model is copied once, not once per layer of calls."""
    from prunekit.pruning import transaction as tx
    from prunekit.pruning.unstructured import sparsify
    from prunekit.pruning.unstructured.sparsifier import Sparsifier

    made = {"n": 0}
    real_init = tx.ModelSnapshot.__init__

    def counting(self, model):
        made["n"] += 1
        real_init(self, model)

    monkeypatch.setattr(tx.ModelSnapshot, "__init__", counting)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    prunekit.prune(model, torch.randn(1, 1, 8, 8), prunekit.SparsityConfig(method="l1", sparsity=0.5))
    assert made["n"] == 1

    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10)
    before, modules = _state(model), list(model.modules())
    monkeypatch.setattr(Sparsifier, "report", lambda self: (_ for _ in ()).throw(RuntimeError("late failure")))
    with pytest.raises(PruningError, match=r"sparsify\(\) failed and was rolled back"):
        sparsify(model, "l1", 0.5, example_inputs=torch.randn(1, 1, 8, 8))
    _same(model, before, modules)
