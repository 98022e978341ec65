"""Sparse pre-training: each method moves the weights the intended way; lam 0 changes nothing; clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning import prune
from prunekit.pruning.sparse_train import (
    GMP,
    SparseSettings,
    channel_variance,
    list_sparse_methods,
    make_sparse_training,
    normalized_entropy,
)
from prunekit.pruning.sparse_train.channels import unit_channels
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.selection import keep_count
from prunekit.pruning.structured.settings import PruneSettings
from prunekit.pruning.unstructured.schedules import cubic_sparsity
from prunekit.train import TrainSettings, fit

METHODS = ["bn_l1", "gmp", "l1_group", "variance_concentration"]
STRONG = {"l1_group": {"lam": 0.05}, "bn_l1": {"lam": 0.05}, "variance_concentration": {"lam": 1.0},
          "gmp": {"sparsity": 0.5, "scope": "local"}}
OFF = {"l1_group": {"lam": 0.0}, "bn_l1": {"lam": 0.0}, "variance_concentration": {"lam": 0.0},
       "gmp": {"sparsity": 0.0}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is far faster than two fighting over a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------- toy model / data
class Tiny(nn.Module):
    """conv -> BN -> ReLU -> grouped conv (2 groups) -> BN -> ReLU -> strided conv -> BN -> ReLU -> flatten -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12 * 4 * 4, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


def tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return m


def data(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()  # 4 learnable classes
    return TensorDataset(x, y)


X1 = torch.randn(1, 1, 8, 8)
SETTINGS = dict(epochs=2, lr=0.1, momentum=0.9, weight_decay=0.0, seed=0)


def train(model: nn.Module, method: str | None = None, epochs: int = 2, **options) -> nn.Module:
    """``fit`` on 64 samples (4 batches an epoch), with sparse ``method`` or plain; returns the model."""
    loader = DataLoader(data(), batch_size=16, shuffle=False)
    s = TrainSettings(**{**SETTINGS, "epochs": epochs})
    loss_fn, callbacks, st = None, (), None
    if method is not None:
        st = make_sparse_training(model, method, example_inputs=X1, total_steps=epochs * len(loader), **options)
        loss_fn, callbacks = st
    fit(model, loader, loader, s, loss_fn=loss_fn, callbacks=callbacks)
    if st is not None:
        st.finalize()
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def all_channels(model: nn.Module, **targets):
    graph = PruningGraph(model, X1)
    return [unit_channels(graph, u) for u in plan_units(graph, PruneSettings.build(targets))]


# ----------------------------------------------------------------------------------------------- registry / errors
def test_registry_lists_the_four_methods():
    assert list_sparse_methods() == METHODS


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        make_sparse_training(tiny(), "l1_grop", 1e-4, X1)
    for name in METHODS:
        assert name in str(e.value)
    assert "did you mean 'l1_group'" in str(e.value)
    with pytest.raises(ConfigError, match="Valid sparse method names"):
        SparseSettings.build({"method": "slimming"})


@pytest.mark.parametrize("lam", [-1e-4, float("nan"), float("inf"), "big"])
def test_bad_lam_is_a_config_error(lam):
    with pytest.raises(ConfigError, match=r"lam=.*(invalid|not a number)"):
        make_sparse_training(tiny(), "l1_group", lam, X1)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="has no option 'sparsity'.*lam, preset, only, ignore"):
        make_sparse_training(tiny(), "l1_group", 1e-4, X1, sparsity=0.5)
    with pytest.raises(ConfigError, match="gmp.*no penalty weight"):
        make_sparse_training(tiny(), "gmp", 1e-4, X1, total_steps=10)
    with pytest.raises(ConfigError, match="sparsity=1.0"):
        make_sparse_training(tiny(), "gmp", None, X1, total_steps=10, sparsity=1.0)
    with pytest.raises(ConfigError, match="gmp needs total_steps"):
        make_sparse_training(tiny(), "gmp", None, X1)
    with pytest.raises(ConfigError, match="start=0.5, end=0.5"):
        make_sparse_training(tiny(), "gmp", None, X1, total_steps=10, start=0.5, end=0.5)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        make_sparse_training(tiny(), "l1_group", 1e-4)
    with pytest.raises(ConfigError, match="ignore: regex 'nope' matches no module"):
        make_sparse_training(tiny(), "l1_group", 1e-4, X1, ignore=["nope"])


def test_settings_validate_and_build():
    with pytest.raises(ConfigError, match="sparsity apply to method gmp only"):
        SparseSettings.build({"method": "l1_group", "sparsity": 0.5})
    with pytest.raises(ConfigError, match="'lam' = -1.*greater than or equal to 0"):
        SparseSettings.build({"method": "l1_group", "lam": -1})
    with pytest.raises(ConfigError, match="gmp has no penalty weight"):
        SparseSettings.build({"method": "gmp", "lam": 0.1})
    with pytest.raises(ConfigError, match="gmp_start 0.8 must be below gmp_end 0.5"):
        SparseSettings.build({"method": "gmp", "gmp_start": 0.8, "gmp_end": 0.5})
    s = SparseSettings.build({"method": "gmp", "sparsity": 0.25, "scope": "local", "ignore": ["conv1"]})
    st = s.make(tiny(), X1, total_steps=8)
    assert isinstance(st.method, GMP) and st.method.sparsity == 0.25 and st.method.scope == "local"
    assert "conv1" not in [u.name for u in st.method.units]
    assert SparseSettings.build(s.to_dict()) == s  # YAML round trip


def test_bn_l1_without_batchnorm_refuses():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    with pytest.raises(PruningError, match="bn_l1 needs affine BatchNorm"):
        make_sparse_training(model, "bn_l1", 1e-4, X1)


def test_variance_penalty_without_a_forward_pass_refuses():
    st = make_sparse_training(tiny(), "variance_concentration", 0.1, X1)
    with pytest.raises(PruningError, match="no activations were recorded"):
        st.method.penalty()
    with torch.no_grad():  # evaluation passes are not recorded
        st.method.model(torch.randn(4, 1, 8, 8))
    with pytest.raises(PruningError, match="no activations were recorded"):
        st.method.penalty()


# ----------------------------------------------------------------------------------------------- group norms
def test_group_norms_match_torch_pruning_group_l2():
    """Our per-channel squared norm == torch-pruning's group L2 importance (sum over layers, with biases)."""
    torch.manual_seed(0)
    model = prunekit.create_model("resnet20", in_channels=3, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    x = torch.randn(1, 3, 16, 16)
    graph = PruningGraph(model, x)
    units = plan_units(graph, PruneSettings())
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True,
                                                 target_types=[nn.modules.conv._ConvNd, nn.Linear,
                                                               nn.modules.batchnorm._BatchNorm])
    for u in units:
        torch.testing.assert_close(unit_channels(graph, u).sq_norms(), imp(u.group).float(), rtol=1e-5, atol=1e-5)


def test_l1_group_penalty_by_hand():
    m = tiny()
    st = make_sparse_training(m, "l1_group", 0.5, X1)
    w1, w2, w3, fc = m.conv1.weight, m.conv2.weight, m.conv3.weight, m.fc.weight
    # conv1 channel c: its filter, bn1 scale/shift, and conv2's input column (grouped: 4 inputs per group)
    c1 = w1.pow(2).sum((1, 2, 3)) + m.bn1.weight ** 2 + m.bn1.bias ** 2
    c1 = c1 + torch.stack([w2[(c // 4) * 4:(c // 4) * 4 + 4, c % 4].pow(2).sum() for c in range(8)])
    c2 = w2.pow(2).sum((1, 2, 3)) + m.bn2.weight ** 2 + m.bn2.bias ** 2 + w3.pow(2).sum((0, 2, 3))
    c3 = (w3.pow(2).sum((1, 2, 3)) + m.conv3.bias ** 2 + m.bn3.weight ** 2 + m.bn3.bias ** 2
          + fc.pow(2).view(4, 12, 16).sum((0, 2)))  # fc reads the flattened (12, 4, 4) map
    expected = 0.5 * sum(c.sqrt().sum() for c in (c1, c2, c3))
    torch.testing.assert_close(st.method.penalty(), expected, rtol=1e-5, atol=1e-6)


def test_l1_group_shrinks_the_weakest_groups():
    plain, sparse = train(tiny()), train(tiny(), "l1_group", lam=0.3)
    weak_ratio, strong_ratio = [], []
    for a, b in zip(all_channels(plain), all_channels(sparse)):
        na, nb = a.sq_norms().sqrt(), b.sq_norms().sqrt()
        order = na.argsort()
        k = max(1, len(order) // 4)
        weak_ratio.append((nb[order[:k]].sum() / na[order[:k]].sum()).item())
        strong_ratio.append((nb[order[-k:]].sum() / na[order[-k:]].sum()).item())
    # every group shrinks, its weakest channels (relatively) most
    assert max(weak_ratio) < 0.6, weak_ratio
    assert all(w < s for w, s in zip(weak_ratio, strong_ratio)), (weak_ratio, strong_ratio)


# ----------------------------------------------------------------------------------------------- bn_l1
def test_bn_l1_gradient_is_lam_sign_gamma():
    m = tiny()
    st = make_sparse_training(m, "bn_l1", 0.01, X1)
    st.method.penalty().backward()
    for bn in (m.bn1, m.bn2, m.bn3):
        torch.testing.assert_close(bn.weight.grad, 0.01 * bn.weight.sign(), rtol=0, atol=1e-9)
        assert bn.bias.grad is None
    assert m.conv1.weight.grad is None


def test_bn_l1_shrinks_bn_scales():
    plain, sparse = train(tiny()), train(tiny(), "bn_l1", lam=0.3)
    for a, b in [(plain.bn1, sparse.bn1), (plain.bn2, sparse.bn2), (plain.bn3, sparse.bn3)]:
        assert b.weight.abs().sum() < 0.7 * a.weight.abs().sum()


# ----------------------------------------------------------------------------------------------- gmp
def test_gmp_follows_the_cubic_schedule():
    gmp = make_sparse_training(tiny(), "gmp", example_inputs=X1, total_steps=200, sparsity=0.5, start=0.1, end=0.6,
                               every=25).method
    assert (gmp.t0, gmp.t1, gmp.step_every) == (20, 120, 25)
    assert gmp.scheduled(0) == gmp.scheduled(20) == 0.0
    assert gmp.scheduled(70) == pytest.approx(0.5 * (1 - 0.5 ** 3))  # the cubic, at the update point 70
    assert gmp.scheduled(94) == gmp.scheduled(70) == cubic_sparsity(70, 20, 120, 0.5)  # held between updates
    assert gmp.scheduled(120) == gmp.scheduled(200) == 0.5
    values = [gmp.scheduled(t) for t in range(201)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone
    assert sorted(set(values))[1:4] == [cubic_sparsity(t, 20, 120, 0.5) for t in (45, 70, 95)]  # ramp updates
    assert len(set(values)) == 5  # 0, three updates on the ramp, the final value


class _Probe:
    """Counts zeroed channels per unit after gmp acted on each step."""

    def __init__(self, gmp: GMP):
        self.gmp, self.seen = gmp, {}

    def on_after_optimizer_step(self, model, step):
        self.seen[step] = {c.name: int((c.sq_norms(weights_only=True) == 0).sum()) for c in self.gmp.channels}


def test_gmp_reaches_the_scheduled_sparsity_at_the_scheduled_steps():
    model = tiny()
    loader = DataLoader(data(), batch_size=8)  # 8 steps an epoch, 16 in all
    st = make_sparse_training(model, "gmp", example_inputs=X1, total_steps=16, sparsity=0.5, end=0.5, every=2,
                              scope="local")
    gmp = st.method
    probe = _Probe(gmp)
    loss_fn, callbacks = st
    fit(model, loader, loader, TrainSettings(**{**SETTINGS, "epochs": 2}), loss_fn=loss_fn,
        callbacks=[*callbacks, probe])
    sizes = {c.name: (c.unit.size, c.unit.ch_groups) for c in gmp.channels}
    assert sizes["conv2"] == (4, 2)  # the grouped conv: 4 elements, each a channel in both blocks
    for step in range(1, 17):
        s = gmp.scheduled(step)
        want = {n: g * (size - keep_count(size, s)) for n, (size, g) in sizes.items()}
        assert probe.seen[step] == want, (step, s)
    assert probe.seen[8] == {"conv1": 4, "conv2": 4, "conv3": 6}  # the final 50 % from step t1 = 8 on
    assert gmp.metrics()["sparse_zero_channels"] == pytest.approx(0.5)


def test_gmp_finalize_restores_the_best_epoch_at_the_final_sparsity(caplog):
    """fit may restore an epoch from before the final sparsity; finalize then takes the best epoch at it."""
    model = tiny()
    st = make_sparse_training(model, "gmp", example_inputs=X1, total_steps=16, sparsity=0.5, end=0.5, scope="local")
    early = state(model)  # weights from before any channel was zeroed (with the all-keep masks)
    loss_fn, callbacks = st
    fit(model, DataLoader(data(), batch_size=8), DataLoader(data(), batch_size=8),
        TrainSettings(**{**SETTINGS, "epochs": 2}), loss_fn=loss_fn, callbacks=callbacks)
    best = st.method._best[1]
    model.load_state_dict(early)  # as if fit had kept an early best epoch
    st.finalize()
    assert "keeping the best epoch at sparsity 0.5" in caplog.text
    torch.testing.assert_close(model.conv2.weight, best["conv2.weight"], rtol=0, atol=0)
    assert sum(int((c.sq_norms() == 0).sum()) for c in all_channels(model)) == 4 + 4 + 6
    assert not any(k.endswith("weight_mask") for k in model.state_dict())  # masks folded into plain zeros


def test_gmp_resumes_like_an_uninterrupted_run(tmp_path):
    """fit's checkpoint carries the masks; after a resume the same channels are selected again."""

    class Crash:
        def on_epoch_end(self, model, epoch, metrics):
            if epoch == 2:
                raise KeyboardInterrupt

    def run(resume: bool, crash: bool) -> dict[str, torch.Tensor]:
        model = tiny()
        loss_fn, callbacks = make_sparse_training(model, "gmp", example_inputs=X1, total_steps=12, sparsity=0.5,
                                                  end=0.9, every=1)
        loader = DataLoader(data(48), batch_size=12)
        s = TrainSettings(**{**SETTINGS, "epochs": 3})
        fit(model, loader, loader, s, run_dir=tmp_path / ("a" if crash or resume else "b"), resume=resume,
            loss_fn=loss_fn, callbacks=[*callbacks, *([Crash()] if crash else [])])
        return state(model)

    with pytest.raises(KeyboardInterrupt):
        run(resume=False, crash=True)
    resumed, straight = run(resume=True, crash=False), run(resume=False, crash=False)
    assert resumed.keys() == straight.keys() and any(k.endswith("weight_mask") for k in straight)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_gmp_masked_model_equals_the_structurally_pruned_model(scope):
    """The zeroed channels are exactly those a later l2 prune at ratio=sparsity removes, at no cost."""
    model = train(tiny(), "gmp", sparsity=0.5, scope=scope).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    pruned = copy.deepcopy(model)
    report = prune(pruned, X1, criterion="l2", ratio=0.5, scope=scope)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), before, rtol=1e-4, atol=1e-5)
    assert report.macs_after < 0.6 * report.macs_before
    zero = sum(int((c.sq_norms() == 0).sum()) for c in all_channels(model))
    assert zero == sum(g.before - g.after for g in report.groups)


# ----------------------------------------------------------------------------------------------- variance
def test_normalized_entropy_and_channel_variance():
    torch.testing.assert_close(normalized_entropy(torch.ones(8)), torch.tensor(1.0))
    assert normalized_entropy(torch.tensor([1.0, 0, 0, 0])) < 1e-4
    v = torch.tensor([3.0, 1.0])
    p = v / 4
    torch.testing.assert_close(normalized_entropy(v), -(p * p.log()).sum() / math.log(2), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(channel_variance(x, 1), x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False))
    t = torch.randn(2, 7, 6)  # (B, T, C) tokens: channels last
    torch.testing.assert_close(channel_variance(t, -1), t.reshape(-1, 6).var(0, unbiased=False))


def test_variance_penalty_by_hand():
    """The hooks read each prunable layer's post-activation output where the next conv/linear consumes it."""
    m = tiny()
    st = make_sparse_training(m, "variance_concentration", 0.3, X1)
    x = torch.randn(16, 1, 8, 8)
    m(x)
    got = st.method.penalty()
    a1 = F.relu(m.bn1(m.conv1(x)))
    a2 = F.relu(m.bn2(m.conv2(a1)))
    a3 = F.relu(m.bn3(m.conv3(a2)))
    v3 = a3.flatten(1).var(0, unbiased=False).view(12, 16).sum(1)  # fc's input features summed per channel
    h = [normalized_entropy(a1.var((0, 2, 3), unbiased=False)), normalized_entropy(a2.var((0, 2, 3), unbiased=False)),
         normalized_entropy(v3)]
    torch.testing.assert_close(got, 0.3 * torch.stack(h).mean(), rtol=1e-5, atol=1e-6)


def test_variance_concentration_has_a_real_gradient_and_lowers_the_entropy():
    x = torch.stack([data()[i][0] for i in range(64)])
    m = tiny()
    st = make_sparse_training(m, "variance_concentration", 1.0, X1)
    m(x)
    st.method.penalty().backward()
    for w in (m.conv1.weight, m.conv2.weight, m.conv3.weight, m.bn1.weight):
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 1e-6
    assert m.fc.weight.grad is None  # the penalty reads fc's input, not its weights
    st.finalize()
    assert not m._forward_pre_hooks and not m.conv2._forward_pre_hooks  # hooks removed

    def entropy(model):
        probe = make_sparse_training(model, "variance_concentration", 1.0, X1).method
        model.train()
        value = probe.entropy(x)
        probe.detach()
        return value

    h0 = entropy(tiny())
    plain = train(tiny(), epochs=3)
    sparse = train(tiny(), "variance_concentration", epochs=3, lam=1.0)
    assert entropy(sparse) < h0 - 0.05
    assert entropy(sparse) < entropy(plain) - 0.05
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), sparse.state_dict().values()))


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=4, in_chans=1).eval()


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_transformer_mlp_variance_reads_tokens_and_gmp_is_exact():
    """On a ViT MLP (preset mlp-only): fc2's input [B, T, hidden] is read channels-last; masked == pruned."""
    vit, x = tiny_vit(), torch.randn(6, 1, 16, 16)
    st = make_sparse_training(vit, "variance_concentration", 1.0, x[:1], preset="mlp-only")
    seen = []
    h = vit.blocks[0].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    vit(x)
    h.remove()
    (a,) = seen  # (B, T, 128) = GELU(fc1(norm2(x)))
    torch.testing.assert_close(st.method.penalty(), normalized_entropy(a.reshape(-1, 128).var(0, unbiased=False)),
                               rtol=1e-5, atol=1e-6)
    st.finalize()

    st = make_sparse_training(vit, "gmp", None, x[:1], total_steps=1, sparsity=0.25, preset="mlp-only")
    st.finalize()
    with torch.no_grad():
        before = vit(x)
    report = prune(vit, x[:1], criterion="l2", ratio=0.25, preset="mlp-only")
    assert report.layers == {"blocks.0.mlp.fc1": [128, 96]}
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
def test_off_changes_nothing_and_on_changes_the_weights(method):
    plain = state(train(tiny()))
    off = state(train(tiny(), method, **OFF[method]))
    for k in plain:
        torch.testing.assert_close(off[k], plain[k], rtol=0, atol=0, msg=f"{method} off changed {k}")
    on = state(train(tiny(), method, **STRONG[method]))
    changed = [k for k in plain if plain[k].is_floating_point() and not torch.allclose(on[k], plain[k], atol=1e-4)]
    assert len(changed) >= 3, changed
