"""CLI: --help of every sub-command, train -> eval -> prune -> finetune end to end with the exact files of each run
dir, a pruned model rebuilt in a fresh process, and one clear message (no traceback) for each user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit import runs
from prunekit.cli.args import COMMANDS
from prunekit.cli.main import _discover, main
from prunekit.errors import ConfigError

_discover()
TRAIN_FILES = runs.RUN_FILES | {runs.HISTORY}


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


@pytest.mark.parametrize("name", COMMANDS.names())
def test_help_of_every_subcommand(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"prunekit {name}" in out and "--config" in out


def test_train_eval_prune_finetune_end_to_end(tmp_path, capsys):
    base, pruned, ft = tmp_path / "base", tmp_path / "pruned", tmp_path / "ft"
    assert main(["train", "--model", "smallcnn", "--epochs", "3", "--lr", "0.05", "--out", str(base)]) == 0
    assert _files(base) == TRAIN_FILES
    m0 = json.loads((base / runs.METRICS).read_text())
    assert {"top1", "top5", "val_loss", "macs", "params"} <= set(m0) and m0["top1"] > 50

    capsys.readouterr()
    assert main(["eval", "--from", str(base)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["top1"] == pytest.approx(m0["top1"]) and ev["macs"] == m0["macs"]

    assert main(["prune", "--from", str(base), "--criterion", "l1", "--ratio", "0.5", "--out", str(pruned)]) == 0
    assert runs.RUN_FILES <= _files(pruned)
    m1 = json.loads((pruned / runs.METRICS).read_text())
    assert m1["macs"] < 0.8 * m0["macs"] and m1["params"] < m0["params"]

    assert main(["finetune", "--from", str(pruned), "--epochs", "1", "--out", str(ft)]) == 0
    assert _files(ft) == TRAIN_FILES
    m2 = json.loads((ft / runs.METRICS).read_text())
    assert m2["macs"] == m1["macs"] and m2["from"] == str(pruned)
    assert yaml_load(ft / runs.CONFIG)["from"] == str(pruned)

    # the pruned model rebuilds in a fresh process from model.json + safetensors, with identical outputs
    spec = runs.read_spec(pruned)
    x = runs.example_inputs(spec, 4)
    ref = runs.load_model(pruned)(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, prunekit; m = prunekit.load_model(sys.argv[1]); "
            "x = torch.load(sys.argv[2], weights_only=True); torch.save(m(x), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(pruned), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), ref, rtol=0, atol=0)


def yaml_load(p: Path):
    import yaml

    return yaml.safe_load(p.read_text())


def _err(argv: list[str], capsys) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


def test_unknown_model_lists_valid_names(tmp_path, capsys):
    err = _err(["train", "--model", "resnet21", "--out", str(tmp_path / "x")], capsys)
    assert "unknown model 'resnet21'" in err and "resnet20" in err


def test_unknown_dataset_lists_valid_names(tmp_path, capsys):
    err = _err(["train", "--dataset", "digts", "--out", str(tmp_path / "x")], capsys)
    assert "unknown dataset 'digts'" in err and "did you mean 'digits'" in err


def test_ratio_outside_unit_interval(trained_run, tmp_path, capsys):
    err = _err(["prune", "--from", str(trained_run), "--ratio", "1.5", "--out", str(tmp_path / "p")], capsys)
    assert "--ratio" in err and "1.5" in err


def test_unknown_criterion(trained_run, tmp_path, capsys):
    err = _err(["prune", "--from", str(trained_run), "--criterion", "l3", "--out", str(tmp_path / "p")], capsys)
    assert "unknown criterion 'l3'" in err and "l1" in err


def test_missing_run_dir(tmp_path, capsys):
    err = _err(["eval", "--from", str(tmp_path / "nope")], capsys)
    assert "does not exist" in err and "nope" in err


def test_corrupt_weights(trained_run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    (bad / runs.WEIGHTS).write_bytes(b"\x00garbage" * 10)
    err = _err(["eval", "--from", str(bad)], capsys)
    assert "model.safetensors" in err and "corrupt" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_device_cuda_without_cuda(trained_run, capsys):
    err = _err(["eval", "--from", str(trained_run), "--device", "cuda"], capsys)
    assert "CUDA is not available" in err


def test_yaml_key_that_does_not_exist_names_closest(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: smallcnn\nepocs: 3\n")
    err = _err(["train", "--config", str(cfg), "--out", str(tmp_path / "x")], capsys)
    assert "unknown key 'epocs'" in err and "did you mean 'epochs'" in err and "c.yaml" in err


def test_config_file_values_are_used_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: smallcnn\nepochs: 1\nlr: 0.05\nbatch_size: 128\n")
    assert main(["train", "--config", str(cfg), "--batch-size", "256", "--out", str(tmp_path / "r")]) == 0
    saved = yaml_load(tmp_path / "r" / runs.CONFIG)
    assert saved["epochs"] == 1 and saved["lr"] == 0.05 and saved["batch_size"] == 256


def test_refuses_to_overwrite_a_finished_run(trained_run, capsys):
    err = _err(["train", "--model", "smallcnn", "--out", str(trained_run)], capsys)
    assert "already holds a run" in err and "--resume" in err


def test_resume_of_a_finished_run_is_refused_and_leaves_it_alone(trained_run, tmp_path, capsys):
    """--resume on a finished run (no last.ckpt) has nothing to continue: refused, not trained again over it."""
    before = {f: (trained_run / f).read_bytes() for f in runs.RUN_FILES}
    err = _err(["train", "--model", "smallcnn", "--epochs", "1", "--out", str(trained_run), "--resume"], capsys)
    assert "holds a finished run" in err and "--resume has nothing to continue" in err and "--overwrite" in err
    assert {f: (trained_run / f).read_bytes() for f in runs.RUN_FILES} == before
    import shutil

    taken = tmp_path / "taken"
    shutil.copytree(trained_run, taken)
    err = _err(["export", "--from", str(trained_run), "--out", str(taken)], capsys)  # export has no --resume
    assert "already holds a run" in err and "--resume" not in err and "--overwrite" in err


def test_flag_mistakes_are_one_line_naming_the_flag(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own check
        main(["prune", "--from", str(trained_run), "--compensate", "foo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--compensate" in err and "'foo'" in err and "'lstsq'" in err
    assert "usage:" not in err
    err = _err(["profile"], capsys)  # two required flags: one line, the flags named, no dict of values
    assert err == ("prunekit profile: error: --baseline and --pruned are required (on the command line, or as "
                   "'baseline', 'pruned' in --config FILE.yaml)\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert "is a file, not a run directory" in _err(["eval", "--from", str(a_file)], capsys)
    err = _err(["run", str(tmp_path / "nope.yaml")], capsys)
    assert "recipe: file" in err and "--config" not in err


def test_run_files_get_the_umask_permissions(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        assert main(["train", "--model", "smallcnn", "--epochs", "1", "--train-samples", "200",
                     "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    modes = {f: (tmp_path / "r" / f).stat().st_mode & 0o777 for f in TRAIN_FILES}
    assert set(modes.values()) == {0o644}, modes


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_history_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    base = tmp_path / "base"
    assert main(["train", "--model", "smallcnn", "--epochs", "2", "--lr", "0.05", "--tensorboard",
                 "--out", str(base)]) == 0
    assert _files(base) == TRAIN_FILES | {runs.TENSORBOARD}
    got = _scalars(base / runs.TENSORBOARD)
    history = runs.read_history(base)
    assert len(history) == 2
    for key in ("top1", "top5", "train_loss", "val_loss", "lr"):
        assert [s for s, _ in got[f"train/{key}"]] == [1, 2]
        assert [v for _, v in got[f"train/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6)


def test_tensorboard_mirror_folds_step_folders_into_the_stage_and_needs_the_package(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "pat"
    with runs.tensorboard_mirror(out):
        assert runs.mirrors_to_tensorboard(out / "steps" / "1")  # a step's own fit opens no second mirror
        (out / "steps" / "1").mkdir(parents=True)
        runs.append_history(out / "steps" / "1", {"phase": "pat-step1", "epoch": 1, "top1": 50.0})  # not mirrored
        runs.append_history(out, {"phase": "pat-prune", "step": 1, "retention_top1": 40.0})
        runs.append_history(out, {"phase": "pat-step1", "epoch": 1, "top1": 50.0})
    assert not runs.mirrors_to_tensorboard(out)  # closed
    assert _scalars(out / runs.TENSORBOARD) == {"pat-prune/retention_top1": [(1, 40.0)], "pat-step1/top1": [(2, 50.0)]}

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the extra is not installed
    with pytest.raises(ConfigError, match=r"--tensorboard needs the tensorboard package.*prunekit\[tensorboard\]"):
        with runs.tensorboard_mirror(tmp_path / "other"):
            pass
