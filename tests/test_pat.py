"""Pruning-aware training: the schedule, the final kept fraction hits the target exactly, retention is logged, and a
killed run resumes from the last finished step."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from prunekit import runs
from prunekit.pipeline.pat import PATConfig, kept_after, pat, prunable_channels
from prunekit.pruning.structured import PruneSettings


def test_schedules_end_at_the_target():
    assert kept_after(3, 3, 0.5, "geometric") == pytest.approx(0.5)
    assert kept_after(1, 2, 0.25, "geometric") == pytest.approx(0.5)
    assert kept_after(1, 4, 0.2, "linear") == pytest.approx(0.8)
    assert kept_after(4, 4, 0.2, "linear") == pytest.approx(0.2)


def test_pat_hits_the_channel_target_exactly_and_logs_retention(trained_run, tmp_path):
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    cfg = PATConfig.build({"from": str(trained_run), "out": str(tmp_path / "pat"), "criterion": "l1", "ratio": 0.5,
                           "steps": 3, "epochs": 1, "lr": 0.01, "tensorboard": tensorboard})
    base = runs.load_model(trained_run)
    x = runs.example_inputs(base.prunekit_spec)
    pool0 = prunable_channels(base, x, PruneSettings())
    m = pat(cfg)
    pruned = runs.load_model(tmp_path / "pat")
    assert prunable_channels(pruned, x, PruneSettings()) == round(0.5 * pool0)
    assert [r["step"] for r in m["retention"]] == [1, 2, 3]
    assert m["retention"][0]["macs"] > m["retention"][1]["macs"] > m["retention"][2]["macs"] == m["macs"]
    hist = runs.read_history(tmp_path / "pat")
    assert [h["step"] for h in hist if h["phase"] == "pat-prune"] == [1, 2, 3]
    assert {h["phase"] for h in hist} >= {"pat-step1", "pat-step2", "pat-step3"}
    assert not (tmp_path / "pat" / "steps").exists() and not (tmp_path / "pat" / runs.CKPT).exists()
    assert {p.name for p in (tmp_path / "pat").iterdir()} == runs.RUN_FILES | {runs.HISTORY} | (
        {runs.TENSORBOARD} if tensorboard else set())
    if tensorboard:  # --tensorboard: the retention of every step and each step's epochs, one x-axis
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "pat" / runs.TENSORBOARD))
        acc.Reload()
        retention = [(e.step, e.value) for e in acc.Scalars("pat-prune/retention_top1")]
        assert [v for _, v in retention] == pytest.approx([r["top1"] for r in m["retention"]])
        assert acc.Scalars("pat-step3/top1")[0].step > retention[-1][0] > acc.Scalars("pat-step2/top1")[0].step


def test_pat_macs_target_within_one_percent(trained_run, tmp_path):
    m = pat(PATConfig.build({"from": str(trained_run), "out": str(tmp_path / "p"), "criterion": "l2",
                             "target_macs": 0.45, "steps": 2, "epochs": 0}))
    base = runs.read_metrics(trained_run)
    assert abs(m["macs"] / base["macs"] - 0.45) <= 0.01


def test_pat_resumes_from_the_last_finished_step(trained_run, tmp_path, monkeypatch):
    import prunekit.pipeline.pat as patmod

    cfg = {"from": str(trained_run), "out": str(tmp_path / "p"), "criterion": "l1", "ratio": 0.4, "steps": 2,
           "epochs": 1, "lr": 0.01}
    real_fit = patmod.fit
    calls = []

    def dying_fit(model, *a, phase="", **kw):
        calls.append(phase)
        if phase == "pat-step2":
            raise KeyboardInterrupt
        return real_fit(model, *a, phase=phase, **kw)

    monkeypatch.setattr(patmod, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        pat(PATConfig.build(cfg))
    assert (tmp_path / "p" / "steps" / "1-done" / runs.WEIGHTS).is_file()
    monkeypatch.setattr(patmod, "fit", real_fit)
    seen = []
    monkeypatch.setattr(patmod, "prune_with_settings",
                        lambda *a, **k: seen.append(1) or patmod.__dict__["_real_prune"](*a, **k), raising=False)
    m = pat(PATConfig.build({**cfg, "resume": True}))
    assert seen == []  # step 2 was already pruned before the kill: it is reloaded, not pruned again
    assert [r["step"] for r in m["retention"]] == [1, 2]
    torch.testing.assert_close(torch.tensor(m["top1"]), torch.tensor(runs.read_metrics(tmp_path / "p")["top1"]))
