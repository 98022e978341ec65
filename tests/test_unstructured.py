"""Unstructured pruning: exact sparsity, N:M / kernel / pattern structure, masks that hold through training, folding,
honest reporting and clear errors (issue 7)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.unstructured import (
    MASK,
    GradualSchedule,
    MaskKeeper,
    Sparsifier,
    SparsifySettings,
    cubic_sparsity,
    fold_masks,
    get_mask,
    iterative_targets,
    layer_storage,
    list_methods,
    masked_layers,
    measure_2to4_latency,
    nm_mask,
    nm_violations,
    select_layers,
    semi_structured_support,
    set_mask,
    sparsify,
)
from prunekit.pruning.unstructured.methods import Taylor
from prunekit.pruning.unstructured.patterns import global_masks, layer_masks
from prunekit.train import TrainSettings, fit

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
SPARSIFIED = ["conv2", "conv3", "fc1"]  # conv1 (first) and fc2 (classifier) stay dense by default


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is far faster than two fighting over a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """conv1 -> BN -> conv2 -> BN -> conv3 (stride 2) -> fc1 -> fc2 on 1x8x8 inputs; every input size is a multiple
    of 4 except conv1's (1 channel)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x)).flatten(1)  # (B, 256)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def loader(n: int = 64, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0).long()  # 4 learnable classes
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def zeros(m: nn.Module) -> int:
    return int((m.weight == 0).sum())


# ----------------------------------------------------------------------------------------------- selection
def test_first_and_last_layers_stay_dense_by_default_and_regexes_select():
    model = tiny()
    sel = select_layers(model, example_inputs=X)
    assert list(sel.layers) == SPARSIFIED
    assert "first layer" in sel.skipped["conv1"] and "classifier" in sel.skipped["fc2"]
    assert sel.macs["conv2"] == 8 * 8 * 8 * (8 * 9)  # output elements x fan-in
    assert list(select_layers(model, dense_first_last=False, example_inputs=X).layers) == ["conv1", *SPARSIFIED,
                                                                                         "fc2"]
    assert list(select_layers(model, only=[r"^conv"], example_inputs=X).layers) == ["conv2", "conv3"]
    assert list(select_layers(model, ignore=[r"fc\d"], example_inputs=X).layers) == ["conv2", "conv3"]
    with pytest.raises(ConfigError, match="--only 'nothing' matches no prunable layer"):
        select_layers(model, only=["nothing"], example_inputs=X)
    with pytest.raises(PruningError, match="no layer left"):
        select_layers(model, ignore=["."], example_inputs=X)


# ----------------------------------------------------------------------------------------------- exact sparsity
@pytest.mark.parametrize("method", ["l1", "random", "taylor"])
@pytest.mark.parametrize("s", [0.3, 0.9])
def test_layerwise_methods_reach_the_exact_sparsity_in_every_layer(method, s):
    model = tiny()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in ("conv1", "fc2")}
    report = sparsify(model, method, s, example_inputs=X, calib_data=loader(), calib_batches=2)
    for name in SPARSIFIED:
        m = model.get_submodule(name)
        assert zeros(m) == round(s * m.weight.numel()), name
        assert torch.equal(get_mask(m), m.weight != 0)
    for name, w in dense.items():  # untouched
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=0)
    assert report.sparsity == pytest.approx(sum(round(s * model.get_submodule(n).weight.numel()) for n in SPARSIFIED)
                                            / sum(model.get_submodule(n).weight.numel() for n in SPARSIFIED))
    assert [r.name for r in report.layers] == SPARSIFIED


def test_global_magnitude_has_one_threshold_and_the_exact_global_count():
    model = tiny()
    weights = {n: model.get_submodule(n).weight.detach().abs().clone() for n in SPARSIFIED}
    sparsify(model, "global", 0.8, example_inputs=X)
    total = sum(w.numel() for w in weights.values())
    assert sum(zeros(model.get_submodule(n)) for n in SPARSIFIED) == round(0.8 * total)
    pruned_max = max(float(w[model.get_submodule(n).weight == 0].max()) for n, w in weights.items())
    kept_min = min(float(w[model.get_submodule(n).weight != 0].min()) for n, w in weights.items())
    assert pruned_max <= kept_min  # one threshold across layers
    assert len({round(zeros(model.get_submodule(n)) / weights[n].numel(), 3) for n in SPARSIFIED}) > 1


def test_hand_set_scores_prune_the_smallest():
    a = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 0.1]]).abs()
    b = torch.tensor([[0.2, 5.0]])
    assert layer_masks({"a": a}, 0.5)["a"].tolist() == [[True, False, False], [True, True, False]]
    g = global_masks({"a": a, "b": b}, 0.5)  # the 4 smallest of 8: 0.1, 0.2, 0.5, 1.0
    assert g["a"].tolist() == [[True, False, False], [True, True, False]] and g["b"].tolist() == [[False, True]]


def test_taylor_scores_are_the_accumulated_abs_w_times_grad():
    model = tiny().eval()
    dl = loader(32, 16)
    layers = {n: model.get_submodule(n) for n in SPARSIFIED}
    got = Taylor().calibrate(model, layers, dl, max_batches=2)
    # every gradient the backward passes filled is put back (biases and BN too, not only the scored weights)
    assert all(p.grad is None for p in model.parameters())
    want = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for x, y in dl:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, m in layers.items():
            want[n] += (m.weight * m.weight.grad).abs()
    for n in SPARSIFIED:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- structures
@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
def test_nm_pattern_holds_in_every_group_along_the_input_dimension(nm):
    n, m = map(int, nm.split(":"))
    model = tiny()
    model.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # 8 input channels: multiple of 4 and 8
    model.bn2 = nn.BatchNorm2d(16)
    model.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    report = sparsify(model, "nm", nm=nm, example_inputs=X)
    for name in SPARSIFIED:
        w = model.get_submodule(name).weight.detach()
        # explicit check: groups of m consecutive INPUT channels at every (output, kernel position)
        rows = w.reshape(w.shape[0], w.shape[1], -1).permute(0, 2, 1) if w.dim() == 4 else w[:, None, :]
        counts = (rows.reshape(*rows.shape[:2], -1, m) != 0).sum(-1)
        assert (counts == n).all(), name  # exactly N kept (trained weights are never exactly zero)
        assert nm_violations(w, n, m) == 0
    assert report.sparsity == pytest.approx(1 - n / m)
    assert all(lr.nm_violations == 0 for lr in report.layers)


def test_nm_keeps_the_largest_of_each_group():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0]])
    assert nm_mask(w.abs(), 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_fallback_dense_warns_and_pad_keeps_min_n_r(caplog):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x))))

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = Odd()
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        report = sparsify(model, "nm", example_inputs=x)
    assert "input size 6 is not a multiple of 4" in report.skipped["c"]
    assert "c" in caplog.text and "left dense" in caplog.text
    assert zeros(model.c) == 0 and zeros(model.b) == 6 * 8 // 2
    padded = Odd()
    sparsify(padded, "nm", example_inputs=x, nm_fallback="pad")
    # 6 inputs = one full group (keep 2) + a group of 2 real + 2 padding (keep min(2, 2) = 2): 4 of 6 kept per row
    assert int((padded.c.weight != 0).sum()) == 8 * 4 and nm_violations(padded.c.weight, 2, 4) == 0


def test_kernel_pruning_leaves_whole_zero_kernels_of_lowest_l1():
    model = tiny()
    l1 = {n: model.get_submodule(n).weight.detach().abs().sum((2, 3)) for n in ("conv2", "conv3")}
    report = sparsify(model, "kernel", 0.6, example_inputs=X)
    assert "not a convolution" in report.skipped["fc1"]
    for name in ("conv2", "conv3"):
        w = model.get_submodule(name).weight.detach()
        nz = (w != 0).sum((2, 3))  # (out, in) non-zeros per kernel
        assert set(nz.unique().tolist()) <= {0, 9}  # whole kernels, nothing in between
        dead = nz == 0
        assert int(dead.sum()) == round(0.6 * dead.numel())
        assert float(l1[name][dead].max()) <= float(l1[name][~dead].min())


def test_intra_kernel_uses_only_the_chosen_patterns_most_frequent_first():
    model = tiny()
    report = sparsify(model, "intra-kernel", example_inputs=X, pattern_keep=4, patterns=3)
    for name in ("conv2", "conv3"):
        w = model.get_submodule(name).weight.detach()
        used = {tuple(k.flatten().tolist()) for k in (w != 0).reshape(-1, 3, 3).int()}
        row = next(r for r in report.layers if r.name == name)
        chosen = {tuple(sum(p, [])) for p in row.patterns}
        assert len(row.patterns) == 3 and used <= chosen
        assert all(sum(p) == 4 for p in chosen)
        assert row.sparsity == pytest.approx(5 / 9)
    # a layer whose kernels mostly favour one pattern: that pattern is chosen first
    conv = nn.Conv2d(4, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.01)
        conv.weight[:, :, 0, :] = 1.0  # top row + ...
        conv.weight[:, :, 1, 1] = 1.0  # ... centre: pattern {0, 1, 2, 4} in all 16 kernels
        conv.weight[0, 0] = torch.arange(9.0).view(3, 3)  # one kernel prefers {5, 6, 7, 8}
    from prunekit.pruning.unstructured.patterns import pattern_mask

    mask, choice = pattern_mask(conv.weight, 4, 1)
    assert choice.codes == [0b10111] and choice.counts == [16]
    assert mask[0, 0].flatten().tolist() == [True, True, True, False, True, False, False, False, False]


# ----------------------------------------------------------------------------------------------- training
def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, keeper: MaskKeeper | None = None,
           check: dict[str, torch.Tensor] | None = None) -> None:
    dl = loader(64, 16, seed=3)
    for _ in range(n):
        for x, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(model.train()(x), y).backward()
            if keeper:
                keeper.on_before_optimizer_step(model, 0)
            opt.step()
            if keeper:
                keeper.on_after_optimizer_step(model, 0)
            for name, mask in (check or {}).items():
                w = model.get_submodule(name).weight
                assert torch.count_nonzero(w.detach()[~mask]) == 0, name  # exactly zero after every step


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_masked_weights_stay_exactly_zero_through_training(opt):
    model = tiny()
    sparsify(model, "l1", 0.7, example_inputs=X)
    masks = {n: get_mask(model.get_submodule(n)).clone() for n in SPARSIFIED}
    before = {n: model.get_submodule(n).weight.detach().clone() for n in SPARSIFIED}
    o = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3) if opt == "sgd"
         else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    _steps(model, o, 2, check=masks)  # the hooks alone (no callback) hold the zeros
    for n in SPARSIFIED:
        w = model.get_submodule(n).weight.detach()
        assert not torch.equal(w[masks[n]], before[n][masks[n]])  # the kept weights did train


def test_mask_keeper_covers_momentum_left_from_before_the_mask():
    model = tiny()
    o = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _steps(model, o, 1)  # momentum buffers are now non-zero everywhere
    sparsify(model, "l1", 0.5, example_inputs=X)
    masks = {n: get_mask(model.get_submodule(n)).clone() for n in SPARSIFIED}
    bare = copy.deepcopy(model)
    ob = torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ob.load_state_dict(o.state_dict())
    with pytest.raises(AssertionError):  # without the keeper, the old momentum revives pruned weights
        _steps(bare, ob, 1, check=masks)
    _steps(model, o, 1, keeper=MaskKeeper(), check=masks)  # asserts exact zeros after every optimizer step


def test_fit_with_iterative_steps_keeps_masks_and_monotone():
    model = tiny()
    sp = Sparsifier(model, method="l1", example_inputs=X)
    s = TrainSettings(epochs=1, lr=0.05, weight_decay=5e-4)
    previous = None
    for target in iterative_targets(0.8, 2):
        sp.step(target)
        mask = {n: get_mask(sp.layers[n]).clone() for n in SPARSIFIED}
        if previous:
            assert all(not (mask[n] & ~previous[n]).any() for n in SPARSIFIED)  # pruned weights stay pruned
        fit(model, loader(), loader(32, seed=9), s, callbacks=[sp])
        for n in SPARSIFIED:
            assert zeros(sp.layers[n]) == round(target * sp.layers[n].weight.numel())
        previous = mask


@pytest.mark.parametrize("method", ["movement", "l1"])
def test_gradual_schedule_reaches_the_final_sparsity_during_training(method):
    model = tiny()
    sp = Sparsifier(model, method=method, sparsity=0.75, example_inputs=X)
    dl = loader()
    sched = GradualSchedule(sp, total_steps=2 * len(dl), final=0.75, end=0.5, every=1)
    sched.start()
    fit(model, dl, loader(32, seed=9), TrainSettings(epochs=2, lr=0.05), callbacks=[sp, sched])
    sched.finish()
    assert sched.updates == 4  # one per optimizer step of the ramp (t1 = 4)
    for n in SPARSIFIED:
        assert zeros(sp.layers[n]) == round(0.75 * sp.layers[n].weight.numel())
    if method == "movement":
        assert sp.method.steps == 2 * len(dl)


def test_gradual_schedule_recalibrates_before_an_evaluation_that_follows_mask_updates():
    """Masks change in epoch 1 only (the ramp ends halfway): the recalibration runs before epoch 1's evaluation, on
    the model being evaluated, and not again in epoch 2."""
    model = tiny()
    sp = Sparsifier(model, method="l1", sparsity=0.75, example_inputs=X)
    dl = loader()
    calls = []
    sched = GradualSchedule(sp, total_steps=2 * len(dl), final=0.75, end=0.5, every=1,
                            recalibrate=lambda m: calls.append((m, sp.sparsity())))
    fit(model, dl, loader(32, seed=9), TrainSettings(epochs=2, lr=0.05), callbacks=[sp, sched])
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == pytest.approx(0.75, abs=1e-3)


def test_schedules_values():
    assert cubic_sparsity(0, 0, 100, 0.8) == 0.0 and cubic_sparsity(100, 0, 100, 0.8) == 0.8
    assert cubic_sparsity(50, 0, 100, 0.8, 0.2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.125)
    assert iterative_targets(0.875, 3) == pytest.approx([0.5, 0.75, 0.875])


# ----------------------------------------------------------------------------------------------- fold, report
def test_permanent_folding_gives_the_same_outputs_and_drops_masks():
    model = tiny().eval()
    sparsify(model, "global", 0.7, example_inputs=X)
    want = model(X)
    assert fold_masks(model) == 3
    assert not masked_layers(model) and not any(k.endswith(MASK) for k in model.state_dict())
    torch.testing.assert_close(model(X), want, rtol=0, atol=0)
    assert all(len(model.get_submodule(n)._forward_pre_hooks) == 0 for n in SPARSIFIED)


def test_report_is_honest_about_macs_and_storage():
    model = tiny()
    report = sparsify(model, "l1", 0.75, example_inputs=X)
    from prunekit.measure import count_macs

    dense_macs = count_macs(tiny(), X)
    assert report.macs == dense_macs  # unstructured sparsity does not cut dense MACs
    cut = sum(lr.macs * lr.zeros / lr.params for lr in report.layers)
    assert report.macs_nonzero == pytest.approx(dense_macs - cut, abs=3)
    assert any("does not reduce dense FLOPs or latency" in n for n in report.notes)
    assert report.nonzero_params == sum(int((p != 0).sum()) for p in model.parameters())
    assert report.storage["csr"] < report.storage["dense"] and report.storage["bitmask"] < report.storage["csr"]
    w = torch.zeros(4, 10)
    w[0, :3] = 1.0  # 3 non-zeros of 40 fp32
    assert layer_storage(w) == {"dense": 160, "csr": 3 * (4 + 2) + 5 * 4, "bitmask": 3 * 4 + 5}
    assert layer_storage(torch.ones(4, 8), nm=(2, 4))["nm"] == 16 * 4 + math.ceil(16 * 2 / 8)


def test_no_speedup_is_claimed_without_sparse_tensor_cores():
    ok, why = semi_structured_support()
    if ok:
        pytest.skip("a GPU with 2:4 sparse tensor cores is present")
    model = tiny()
    sparsify(model, "nm", example_inputs=X)
    r = measure_2to4_latency(model, X)
    assert r["measured"] is False and "no speed-up is claimed" in r["reason"]


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    ({"method": "l1", "sparsity": 1.0}, r"sparsity.*\[0, 1\)"),
    ({"method": "l1", "sparsity": -0.1}, r"sparsity.*\[0, 1\)"),
    ({"method": "nm", "nm": "4:4"}, r"0 < N < M"),
    ({"method": "nm", "nm": "3:2"}, r"0 < N < M"),
    ({"method": "nm", "nm": "two:four"}, r"N:M"),
    ({"method": "magnitude"}, r"unknown sparsify method 'magnitude'.*Valid"),
    ({"method": "nm", "sparsity": 0.7}, r"--sparsity 0.7 does not apply to method 'nm'"),
    ({"method": "global", "scope": "layer"}, r"contradicts"),
    ({"method": "l1", "only": ["("]}, r"not a valid regular expression"),
])
def test_bad_settings_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        SparsifySettings.build(kw, source="sparsify")


def test_movement_without_training_is_an_error():
    with pytest.raises(ConfigError, match="movement.*cannot prune one-shot"):
        sparsify(tiny(), "movement", 0.5, example_inputs=X)
    sp = Sparsifier(tiny(), method="movement", example_inputs=X)
    with pytest.raises(PruningError, match="needs a training phase"):
        sp.step(0.5)
    with pytest.raises(ConfigError, match="needs a training phase"):
        GradualSchedule(sp, total_steps=0, final=0.5)


def test_taylor_without_data_and_mismatched_masks_are_errors():
    with pytest.raises(PruningError, match="needs calibration data"):
        sparsify(tiny(), "taylor", 0.5, example_inputs=X)
    model = tiny()
    with pytest.raises(PruningError, match="does not fit the weight"):
        set_mask(model.fc1, torch.ones(3, 3, dtype=torch.bool), "fc1")
    assert "l1" in list_methods() and len(list_methods()) == 10  # 8 + the decoder-LM methods wanda, sparsegpt


def test_2to4_kernel_eligibility_is_checked_per_layer():
    from prunekit.pruning.unstructured.semi_structured import _eligible

    cutlass = torch.sparse.SparseSemiStructuredTensorCUTLASS
    lin = nn.Linear(64, 64)
    assert "not 2:4" in _eligible(lin, torch.float16, cutlass)
    sparsify_one = nn.Sequential(nn.Linear(8, 64), lin, nn.Linear(64, 2))
    sparsify(sparsify_one, "nm", example_inputs=torch.randn(1, 8))
    assert _eligible(lin, torch.float16, cutlass) is None
    small = nn.Linear(8, 48)
    set_mask(small, nm_mask(small.weight.abs(), 2, 4))
    assert "not a multiple" in _eligible(small, torch.float16, cutlass)
    assert "not a linear layer" in _eligible(nn.Conv2d(4, 4, 3), torch.float16, cutlass)
