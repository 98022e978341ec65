"""Closed-form, error-correcting refit of the consumers of pruned channels (``refit_consumers``): it is the exact
least-squares fit of the corrected target, it lowers the pruned model's error on data it was not fitted on (beyond
``lstsq`` compensation), finds where each layer's output meets the residual stream, and refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning import prune
from prunekit.pruning.structured.reconstruct_closed import consumers_of, merge_point, refit_consumers


class Block(nn.Module):
    """Post-LN residual MLP block (BERT's FFN half): LN(x + fc2(gelu(fc1(x))))."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class PreNorm(nn.Module):
    """Pre-LN block, x + fc2(gelu(fc1(LN(x)))): no norm after fc2, so its output meets the stream at the block's."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, block: type = Block, d_in: int = 12, d: int = 16, h: int = 48, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[block(d, h) for _ in range(depth)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def data(seed: int, n: int, batch: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 12, generator=torch.Generator().manual_seed(99))  # the same low-rank structure everywhere
    x = torch.randn(n, 6, generator=g) @ mix + 0.1 * torch.randn(n, 12, generator=g)
    return list(x.split(batch))


def pruned(block: type = Block) -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    dense = Stack(block).eval()
    model = copy.deepcopy(dense)
    report = prune(model, torch.randn(2, 12), "variance", ratio=0.6, scope="local", only=[r"blocks\.\d+\.fc1"],
                   calib_data=data(1, 1024), compensate="lstsq", calib_batches=16)
    return dense, model, report


@torch.no_grad()
def error(dense: nn.Module, model: nn.Module) -> float:
    x = torch.cat(data(2, 512))  # held out: another draw than the calibration batches
    return float((model(x) - dense(x)).square().mean() / dense(x).square().mean())


@pytest.mark.parametrize("block", [Block, PreNorm])
def test_refit_lowers_held_out_error_beyond_compensation(block):
    dense, compensated, report = pruned(block)
    layers = consumers_of(compensated, report.groups)
    assert layers == {f"blocks.{i}": [f"blocks.{i}.fc2"] for i in range(3)}
    model, default = copy.deepcopy(compensated), copy.deepcopy(compensated)
    records = refit_consumers(model, dense, data(1, 1024), layers, max_batches=16, ridge=0.01)
    assert [r["layer"] for r in records] == ["blocks.0.fc2", "blocks.1.fc2", "blocks.2.fc2"]
    assert all(r["error_after"] < r["error_before"] and r["tokens"] == 1024 for r in records), records
    before, after = error(dense, compensated), error(dense, model)
    assert after < 0.8 * before, (before, after)
    refit_consumers(default, dense, data(1, 1024), layers, max_batches=16)  # ridge 1: a smaller step, same way
    assert after < error(dense, default) < before
    # only the consumers move
    for name in ("embed.weight", "blocks.1.fc1.weight", "blocks.1.norm.weight", "head.bias"):
        assert torch.equal(model.state_dict()[name], compensated.state_dict()[name])


def test_merge_point_is_the_norm_after_the_layer_else_the_block():
    model = Stack(Block)
    assert merge_point(model, "blocks.1", "blocks.1.fc2", torch.randn(2, 12)) == "blocks.1.norm"
    model = Stack(PreNorm)  # its norm runs before fc2: the output of the block is where fc2's output lands
    assert merge_point(model, "blocks.1", "blocks.1.fc2", torch.randn(2, 12)) == "blocks.1"


@torch.no_grad()
def corrected_target(model: nn.Module, dense: nn.Module, calib: list[torch.Tensor]):
    """Block 1's fc2 inputs in the pruned model, ``fc2(x_p) + z_dense - z_pruned`` and ``1 / Var(z_dense)`` per row."""
    xs, ts, ws = [], [], []
    for x in calib:
        h_p, h_d = model.blocks[0](model.embed(x)), dense.blocks[0](dense.embed(x))
        b, bd = model.blocks[1], dense.blocks[1]
        a = torch.nn.functional.gelu(b.fc1(h_p))
        z_d = h_d + bd.fc2(torch.nn.functional.gelu(bd.fc1(h_d)))
        xs.append(a)
        ts.append(b.fc2(a) + z_d - (h_p + b.fc2(a)))
        ws.append(1 / z_d.var(-1, unbiased=False))
    return torch.cat(xs).double(), torch.cat(ts).double(), torch.cat(ws).double()


@pytest.mark.parametrize("weight", ["none", "norm"])
@torch.no_grad()
def test_refit_is_the_least_squares_fit_of_the_corrected_target(weight):
    """Block 1's fc2 (ridge ~0) equals the (weighted) least-squares solution of ``fc2(x_p) + z_dense - z_pruned`` on
    the pruned model's fc2 inputs, computed here directly with ``torch.linalg.lstsq``; block 0 was refit before."""
    dense, model, report = pruned(Block)
    calib = data(1, 1024)
    layers = consumers_of(model, report.groups)
    refit_consumers(model, dense, calib, {"blocks.0": layers["blocks.0"]}, max_batches=16, ridge=1e-9, weight=weight)
    X, T, w = corrected_target(model, dense, calib)
    sw = w.sqrt()[:, None] if weight == "norm" else torch.ones(len(X), 1, dtype=X.dtype)
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    sol = torch.linalg.lstsq(X1 * sw, T * sw).solution  # (h + 1, d)
    refit_consumers(model, dense, calib, {"blocks.1": layers["blocks.1"]}, max_batches=16, ridge=1e-9, weight=weight)
    torch.testing.assert_close(model.blocks[1].fc2.weight.double(), sol[:-1].T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(model.blocks[1].fc2.bias.double(), sol[-1], atol=2e-4, rtol=1e-3)


def test_a_large_ridge_keeps_the_compensated_weights():
    """The ridge pulls towards the current weights, not towards 0: with a huge ridge only the bias moves."""
    dense, model, report = pruned(Block)
    w = model.blocks[2].fc2.weight.detach().clone()
    refit_consumers(model, dense, data(1, 1024), consumers_of(model, report.groups), max_batches=16, ridge=1e8)
    torch.testing.assert_close(model.blocks[2].fc2.weight, w, atol=1e-5, rtol=1e-4)


def test_bad_input_is_a_typed_error():
    dense, model, report = pruned(Block)
    layers = consumers_of(model, report.groups)
    with pytest.raises(ConfigError, match="ridge"):
        refit_consumers(model, dense, data(1, 128), layers, ridge=-1.0)
    with pytest.raises(ConfigError, match="weight='tokens'.*norm, none"):
        refit_consumers(model, dense, data(1, 128), layers, weight="tokens")
    with pytest.raises(PruningError, match="no calibration batches"):
        refit_consumers(model, dense, [], layers)
    with pytest.raises(PruningError, match="not Linear"):
        refit_consumers(model, dense, data(1, 128), {"blocks.0": ["blocks.0.norm"]})


def test_prune_refit_flag_runs_the_refit_inside_the_call():
    torch.manual_seed(0)
    dense = Stack(Block).eval()
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    kw = dict(ratio=0.6, scope="local", only=[r"blocks\.\d+\.fc1"], calib_data=data(1, 1024), compensate="lstsq",
              calib_batches=16)
    assert not prune(plain, torch.randn(2, 12), "variance", refit=False, **kw).refit
    report = prune(fitted, torch.randn(2, 12), "variance", refit=True, **kw)
    assert [r["layer"] for r in report.refit] == ["blocks.0.fc2", "blocks.1.fc2", "blocks.2.fc2"]
    assert "refitted 3 consumer layers" in report.summary()
    assert error(dense, fitted) < error(dense, plain)
    with pytest.raises(ConfigError, match="refit=True needs calibration data"):
        prune(copy.deepcopy(dense), torch.randn(2, 12), "variance", ratio=0.5, refit=True)


@pytest.mark.parametrize("compensate,refits", [("lstsq", True), ("auto", True), ("mean", False), ("none", False)])
def test_refit_is_on_by_default_with_lstsq_only(compensate, refits):
    torch.manual_seed(0)
    dense = Stack(Block).eval()
    model = copy.deepcopy(dense)
    report = prune(model, torch.randn(2, 12), "variance", ratio=0.6, scope="local", only=[r"blocks\.\d+\.fc1"],
                   calib_data=data(1, 1024), compensate=compensate, calib_batches=16)
    assert bool(report.refit) is refits
    assert (len(report.refit) == 3) is refits


def test_default_refit_on_a_cnn_does_nothing_and_copies_nothing():
    """No Linear consumer inside a block (a CNN): the default refit neither runs nor keeps a dense copy."""
    from prunekit.pruning.structured import StructuredConfig
    from prunekit.pruning.structured.engine import StructuredPruner

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    cfg = StructuredConfig.build({"criterion": "variance", "ratio": 0.5})
    pruner = StructuredPruner(net, torch.randn(2, 3, 8, 8), cfg, calib_data=[torch.randn(4, 3, 8, 8)] * 4)
    report = pruner.run()
    assert report.compensate == "lstsq" and pruner.refit_on and not report.refit
    assert pruner.reference is None
