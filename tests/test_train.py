"""Training loop: it learns, a killed + resumed run equals an uninterrupted one, KD, early stopping, history."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import runs
from prunekit.data import get_dataset, make_loader
from prunekit.train import TrainSettings, evaluate, fit
from prunekit.train.kd import kd_loss


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 10))


def _loaders(n_train=256):
    tr = torch.utils.data.Subset(get_dataset("digits", "train"), range(n_train))
    return make_loader(tr, 32, shuffle=True, seed=1), make_loader(get_dataset("digits", "val"), 128)


def test_fit_learns_and_writes_history(tmp_path):
    tr, va = _loaders()
    model = _net()
    before = evaluate(model, va)["top1"]
    res = fit(model, tr, va, TrainSettings(epochs=3, lr=0.1), run_dir=tmp_path)
    assert res["top1"] > before + 30
    hist = [json.loads(x) for x in (tmp_path / runs.HISTORY).read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert set(hist[0]) >= {"epoch", "phase", "train_loss", "val_loss", "top1", "top5", "lr", "seconds"}
    # the model ends with the best epoch's weights
    assert evaluate(model, va)["top1"] == pytest.approx(max(h["top1"] for h in hist))


class _Kill:
    """Simulates a kill in the middle of epoch 2 (after the checkpoint of epoch 1 was written)."""

    def on_after_optimizer_step(self, model, step):
        if step == 12:  # 8 steps per epoch
            raise KeyboardInterrupt


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    s = TrainSettings(epochs=3, lr=0.05, warmup_epochs=0.5)
    tr, va = _loaders()
    ref = _net()
    fit(ref, tr, va, s, run_dir=tmp_path / "ref")

    tr, va = _loaders()
    m = _net()
    with pytest.raises(KeyboardInterrupt):
        fit(m, tr, va, s, run_dir=tmp_path / "cut", callbacks=[_Kill()])
    assert (tmp_path / "cut" / runs.CKPT).is_file()
    ck = torch.load(tmp_path / "cut" / runs.CKPT, weights_only=True)
    assert ck["epoch"] == 1
    tr, va = _loaders()
    m2 = _net()
    fit(m2, tr, va, s, run_dir=tmp_path / "cut", resume=True)
    for (k, a), b in zip(ref.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert (tmp_path / "ref" / runs.HISTORY).read_text().count("\n") == 3
    assert (tmp_path / "cut" / runs.HISTORY).read_text().count("\n") == 3


def test_resume_refuses_other_settings_a_damaged_checkpoint_and_another_model(tmp_path):
    """A checkpoint continues only the run that wrote it: other settings, a truncated file or a model it does not fit
    are each one clear error (a resumed run with other epochs or lr would silently mix two schedules)."""
    from prunekit.errors import ConfigError, RunDirError

    s = TrainSettings(epochs=3, lr=0.05)
    tr, va = _loaders(64)
    with pytest.raises(KeyboardInterrupt):
        fit(_net(), tr, va, s, run_dir=tmp_path, callbacks=[_Kill2()])
    ck = tmp_path / runs.CKPT
    assert torch.load(ck, weights_only=True)["settings"]["lr"] == 0.05
    with pytest.raises(ConfigError, match=r"other settings \(epochs: 3 in the checkpoint, 6 now; lr: 0.05 in the "
                                          r"checkpoint, 0.5 now\).*--overwrite"):
        fit(_net(), tr, va, TrainSettings(epochs=6, lr=0.5), run_dir=tmp_path, resume=True)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match="does not fit this model.*--model"):
        fit(other, tr, va, s, run_dir=tmp_path, resume=True)
    ck.write_bytes(ck.read_bytes()[:500])
    with pytest.raises(RunDirError, match="last.ckpt' cannot be read.*damaged.*--overwrite"):
        fit(_net(), tr, va, s, run_dir=tmp_path, resume=True)


class _Kill2:
    """A kill after the first epoch's checkpoint of a 64-sample loader (2 steps per epoch)."""

    def on_after_optimizer_step(self, model, step):
        if step == 3:
            raise KeyboardInterrupt


def test_early_stopping_stops_after_patience():
    tr, va = _loaders(64)
    model = _net()
    res = fit(model, tr, va, TrainSettings(epochs=20, lr=1e-9, patience=2))
    assert res["epochs_run"] == 20 and res["epoch"] == 1  # best stays the first epoch; training stopped early

    class Count:
        n = 0

        def on_epoch_end(self, model, epoch, metrics):
            Count.n += 1

    fit(_net(), tr, va, TrainSettings(epochs=20, lr=1e-9, patience=2), callbacks=[Count()])
    assert Count.n == 3


def test_kd_loss_is_ce_at_alpha_one_and_zero_for_identical_logits():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(kd_loss(s, t, y, 1.0, 4.0), F.cross_entropy(s, y))
    torch.testing.assert_close(kd_loss(s, s, y, 0.0, 2.0), torch.tensor(0.0), atol=1e-6, rtol=0)
    # T^2 scaling: the soft term's gradient magnitude does not vanish as T grows
    s.requires_grad_(True)
    kd_loss(s, t, y, 0.0, 8.0).backward()
    assert s.grad.abs().sum() > 1e-2


def test_device_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        TrainSettings.build({"device": "cuda"})
