"""Honest splits: train / calib / val / test are disjoint and seeded, val is carved from the training data, epochs are
picked on val, figures are reported on test, and a fine-tune keeps its start model when no epoch beats it."""

from __future__ import annotations

import gzip
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunekit import runs
from prunekit.data import DataArgs, get_dataset, make_loader, val_split_indices
from prunekit.data.core import data_settings
from prunekit.errors import ConfigError
from prunekit.train import TrainSettings, evaluate, fit, loop


def _indices(ds: torch.utils.data.Dataset) -> list[int]:
    assert isinstance(ds, torch.utils.data.Subset)
    return list(ds.indices)


# ------------------------------------------------------------------------------------------------ the splits
def test_digits_splits_are_disjoint_seeded_stratified_and_add_up():
    tr, cal, va, te = (get_dataset("digits", s) for s in ("train", "calib", "val", "test"))
    assert len(tr) + len(va) + len(te) == 1797 and len(te) == 360  # test: digits' fixed 20%
    assert _indices(cal) == _indices(tr)  # calib: the training images, not augmented
    assert not set(_indices(tr)) & set(_indices(va))
    assert sorted(_indices(tr) + _indices(va)) == list(range(len(tr) + len(va)))  # together: the training source
    assert len(va) == pytest.approx(0.1 * (len(tr) + len(va)), abs=10)
    labels = va.dataset.labels
    per_class = torch.bincount(labels[_indices(va)], minlength=10)
    whole = torch.bincount(labels, minlength=10)
    assert ((per_class - 0.1 * whole).abs() <= 1).all()  # stratified: about 10% of every class
    assert _indices(get_dataset("digits", "val")) == _indices(va)  # seeded: the same indices twice
    other = get_dataset("digits", "val", val_seed=1)
    assert len(other) == len(va) and _indices(other) != _indices(va)
    bigger = get_dataset("digits", "val", val_fraction=0.2)
    assert len(bigger) == pytest.approx(2 * len(va), abs=10)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_val_is_carved_from_the_training_files_never_from_test(tmp_path):
    """MNIST-format files whose training images have pixel values 0..59 and test images 255: the val split's images
    come from the training file, and the test split is the whole t10k file."""
    train = np.stack([np.full((28, 28), i) for i in range(60)])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(60) % 3)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.full((7, 28, 28), 255))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7) % 3)
    va, tr, te = (get_dataset("mnist", s, data_dir=tmp_path) for s in ("val", "train", "test"))
    assert (len(tr), len(va), len(te)) == (54, 6, 7)

    def pixel(ds, i):  # the raw value back from the normalised image
        return round(float(ds[i][0][0, 14, 14]) * 0.3081 * 255 + 0.1307 * 255)

    vals = sorted(pixel(va, i) for i in range(len(va)))
    assert vals == sorted(_indices(va)) and all(v < 60 for v in vals)
    assert all(pixel(te, i) == 255 for i in range(len(te)))
    assert sorted(torch.stack([va[i][1] for i in range(6)]).tolist()) == [0, 0, 1, 1, 2, 2]  # 2 of each class


def test_bad_split_and_val_fraction_are_config_errors():
    with pytest.raises(ConfigError, match="split 'holdout' is not valid; choose from train, calib, val, test"):
        get_dataset("digits", "holdout")
    with pytest.raises(ConfigError, match="--val-fraction 0.001 leaves no validation samples out of 1437"):
        get_dataset("digits", "val", val_fraction=0.001)
    with pytest.raises(ConfigError, match="no training samples"):
        val_split_indices(4, 0.9, 0)
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(Exception, match="val_fraction"):
            DataArgs(val_fraction=bad)


def test_split_settings_are_inherited_and_a_flag_wins():
    assert data_settings(DataArgs(), {})["val_fraction"] == 0.1 and data_settings(DataArgs(), {})["val_seed"] == 0
    src = {"dataset": "digits", "val_fraction": 0.2, "val_seed": 5}
    got = data_settings(DataArgs(), src)
    assert (got["val_fraction"], got["val_seed"]) == (0.2, 5)  # a fine-tune validates on what its source held out
    got = data_settings(DataArgs(val_fraction=0.3, val_seed=0), src)
    assert (got["val_fraction"], got["val_seed"]) == (0.3, 0)


# ------------------------------------------------------------------------------------------------ fit
def _toy(x: list[float], n: int = 4) -> torch.utils.data.DataLoader:
    return make_loader(torch.utils.data.TensorDataset(torch.tensor([x] * n), torch.zeros(n, dtype=torch.long)), n)


def _set_weights(presets: dict[int, list[list[float]]]):
    """A stand-in for ``train_one_epoch`` that gives the model preset weights at each epoch."""

    def step(net, loader, optimizer, scheduler, s, epoch, *args, **kwargs):
        with torch.no_grad():
            net.weight.copy_(torch.tensor(presets[epoch + 1]))
        return 0.5

    return step


def test_best_epoch_is_chosen_on_val_not_on_test(monkeypatch):
    """Epoch 1 is right on val and wrong on test, epoch 2 the reverse: fit keeps epoch 1."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # the start: class 1 everywhere, wrong on both
    val, test = _toy([1.0, 0.0]), _toy([0.0, 1.0])
    monkeypatch.setattr(loop, "train_one_epoch", _set_weights({1: [[1, 0], [0, 1]], 2: [[0, 1], [1, 0]]}))
    res = fit(model, _toy([1.0, 0.0]), val, TrainSettings(epochs=2, lr=0.1), start_candidate=True)
    assert res["epoch"] == 1 and res["top1"] == 100.0 and res["start"]["top1"] == 0.0 and not res["kept_start"]
    torch.testing.assert_close(model.weight, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert evaluate(model, val)["top1"] == 100.0 and evaluate(model, test)["top1"] == 0.0  # test did not choose


def test_fit_keeps_the_start_model_when_every_epoch_is_worse(monkeypatch, caplog):
    model = nn.Linear(2, 2, bias=False)
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        model.weight.copy_(start)
    monkeypatch.setattr(loop, "train_one_epoch", _set_weights({1: [[0, 1], [1, 0]], 2: [[0, 0], [1, 1]]}))
    with caplog.at_level(logging.WARNING):
        res = fit(model, _toy([1.0, 0.0]), _toy([1.0, 0.0]), TrainSettings(epochs=2, lr=0.1), phase="finetune",
                  start_candidate=True)
    assert res["kept_start"] and res["epoch"] == 0 and res["epochs_run"] == 2
    torch.testing.assert_close(model.weight, start, rtol=0, atol=0)
    assert "NO EPOCH BEAT THE STARTING MODEL" in caplog.text
    # without the start as a candidate the best epoch wins even when it is worse than the start
    with torch.no_grad():
        model.weight.copy_(start)
    res = fit(model, _toy([1.0, 0.0]), _toy([1.0, 0.0]), TrainSettings(epochs=2, lr=0.1))
    assert res["epoch"] == 1 and "kept_start" not in res


# ------------------------------------------------------------------------------------------------ the stages
def _scramble(net, loader, optimizer, scheduler, s, epoch, *args, **kwargs):
    """A training epoch that ruins the model: every weight replaced by noise."""
    g = torch.Generator().manual_seed(epoch)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return 9.0


def test_train_reports_test_and_finetune_keeps_a_better_start(tmp_path, monkeypatch, caplog):
    from prunekit.pipeline.stages import FinetuneConfig, TrainConfig, finetune, loaders, train

    base, ft = tmp_path / "base", tmp_path / "ft"
    m = train(TrainConfig(model="smallcnn", epochs=2, lr=0.05, out=base, val_seed=3))
    data = data_settings(DataArgs(), runs.read_config(base))
    assert (data["val_fraction"], data["val_seed"]) == (0.1, 3)  # the split recipe is in config.yaml
    ld = loaders(data, 256, splits=("val", "test"))
    model = runs.load_model(base)
    saved = json.loads((base / runs.METRICS).read_text())
    assert saved["top1"] == pytest.approx(evaluate(model, ld["test"])["top1"])  # top1 is the test figure
    assert saved["val_top1"] == pytest.approx(evaluate(model, ld["val"])["top1"])
    assert saved["test_samples"] == 360 and {"test_loss", "val_loss"} <= set(saved)
    assert saved["splits"] == {"val_fraction": 0.1, "val_seed": 3, "train": 1295, "val": 142, "test": 360}
    assert m["top1"] == saved["top1"]

    monkeypatch.setattr(loop, "train_one_epoch", _scramble)
    with caplog.at_level(logging.WARNING):
        mf = finetune(FinetuneConfig(**{"from": base}, epochs=2, lr=0.01, out=ft))
    assert mf["kept_start"] and mf["best_epoch"] == 0 and not mf["below_start"]
    assert mf["top1"] == pytest.approx(saved["top1"]) == pytest.approx(mf["start_top1"])
    assert mf["start_val_top1"] == pytest.approx(saved["val_top1"]) and mf["val_seed"] == 3  # inherited split
    assert "KEPT THE START MODEL" in caplog.text
    for (k, a), b in zip(model.state_dict().items(), runs.load_model(ft).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_finetune_below_its_start_on_test_says_so(caplog):
    from prunekit.pipeline.stages import start_check

    best = {"epoch": 2, "top1": 85.0, "kept_start": False, "start": {"top1": 80.0}}
    with caplog.at_level(logging.WARNING):
        got = start_check({"top1": 90.0}, best, 88.0, "finetune")
    assert got == {"start_top1": 90.0, "start_val_top1": 80.0, "kept_start": False, "below_start": True}
    assert "TEST TOP1 88.00% IS BELOW THE START'S 90.00%" in caplog.text
    assert not start_check({"top1": 90.0}, best, 91.0, "finetune")["below_start"]


def test_report_says_which_figures_are_not_test_figures_and_which_fine_tunes_kept_their_start():
    from prunekit.report.collect import RunRecord, split_notes

    def rec(label, **m):
        return RunRecord(dir=Path(label), label=label, metrics={"top1": 90.0, **m}, spec={}, lineage=[],
                         baseline_dir=None, baseline=None)

    notes = split_notes([rec("base", test_loss=0.1, stage="train"), rec("old", stage="finetune"),
                         rec("pruned", stage="prune"), rec("kept", test_loss=0.2, kept_start=True),
                         rec("worse", test_loss=0.3, below_start=True, start_top1=91.5)])
    assert len(notes) == 3
    assert "The top-1 of old is not marked as a test-split figure" in notes[0]  # no epochs picked: pruned is fine
    assert "start model on val for kept" in notes[1]
    assert "worse (90.00 < 91.50)" in notes[2]
    assert split_notes([rec("base", test_loss=0.1)]) == []
