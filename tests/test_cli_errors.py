"""The CLI's user mistakes end in one line and exit 2 (or work): the cases a new user hit (issue 27, items 6-8)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from prunekit.cli.main import main
from prunekit.errors import ConfigError, RunDirError


def err(capsys, argv: list[str], rc: int = 2) -> str:
    """Run the CLI; assert its exit code and that stderr is one line (no traceback); return that line."""
    assert main(argv) == rc
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if "it/s]" not in x]  # transformers' bars
    assert "Traceback" not in "\n".join(lines) and len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    """Tiny random Llama folders: vocab 256 (a byte model), vocab 1000 (no tokenizer files); a text file."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("llm")
    for name, vocab in (("bytes", 256), ("v1000", 1000)):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(root / name)
    (root / "t.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return root


# ----------------------------------------------------------------------------------------------- raw tracebacks
def test_eval_text_on_an_image_run_is_one_line(trained_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    e = err(capsys, ["eval", "--from", str(trained_run), "--text", str(text)])
    assert e.startswith("prunekit eval: error: --text:") and "not a language model" in e and "drop --text" in e


def test_a_fixed_size_vit_on_16px_digits_names_the_flags(tmp_path, capsys):
    out = tmp_path / "vit"
    e = err(capsys, ["train", "--model", "timm:vit_tiny_patch16_224", "--epochs", "1", "--out", str(out)])
    assert "--image-size 16" in e and "224x224" in e and "--model-kwargs img_size=16" in e
    assert not out.exists()  # refused before any work


def test_model_kwargs_strings_are_yaml_scalars():
    from prunekit.models import create_model
    from prunekit.models.external import parse_scalar

    assert [parse_scalar(v) for v in ("16", "0.5", "true", "null", "[8, 8]", "no", "resnet", "")] == \
        [16, 0.5, True, None, [8, 8], "no", "resnet", ""]
    model = create_model("timm:vit_tiny_patch16_224", in_channels=1, num_classes=3, img_size="16", patch_size="4",
                         depth="1")  # what --model-kwargs img_size=16,patch_size=4,depth=1 passes
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert {k: model.prunekit_spec.kwargs[k] for k in ("img_size", "patch_size", "depth")} == \
        {"img_size": 16, "patch_size": 4, "depth": 1}


def test_an_unexpected_error_is_one_line_and_the_traceback_needs_debug(trained_run, capsys, monkeypatch):
    from prunekit.pipeline.commands import COMMANDS

    def boom(cfg):
        raise RuntimeError("something deep broke\nsecond line")

    monkeypatch.setattr(COMMANDS.get("eval"), "run", boom)  # the function the registry runs for `prunekit eval`
    e = err(capsys, ["eval", "--from", str(trained_run)], rc=1)
    assert e == ("prunekit eval: error: unexpected RuntimeError: something deep broke; run with --debug for the "
                 "traceback")
    assert main(["eval", "--from", str(trained_run), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_crashed_run_does_not_block_its_out(trained_run, tmp_path, capsys):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "log.txt").write_text("train: ... AssertionError\n")  # all a crash before the metrics leaves
    assert main(["eval", "--from", str(trained_run), "--out", str(crashed)]) == 0
    assert (crashed / "metrics.json").is_file() and "AssertionError" not in (crashed / "log.txt").read_text()
    from prunekit.runs import prepare_out_dir

    resumable = tmp_path / "resumable"
    resumable.mkdir()
    for f in ("log.txt", "last.ckpt"):
        (resumable / f).write_text("x")
    with pytest.raises(RunDirError, match="--resume"):  # a checkpoint is kept: resume it or overwrite it
        prepare_out_dir(resumable)
    with pytest.raises(RunDirError, match="already holds a run"):
        prepare_out_dir(trained_run)  # a finished run is never replaced without --overwrite


# ----------------------------------------------------------------------------------------------- misleading messages
def test_weights_mismatches_are_summarised_with_real_flags(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from prunekit.models import create_model

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in trained_run.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(trained_run / "model.safetensors"))
    wider = {k: torch.zeros(*(s + 1 for s in v.shape)) if v.ndim else v for k, v in sd.items()}
    save_file(wider, str(bad / "model.safetensors"))
    n = sum(v.ndim > 0 for v in sd.values())
    e = err(capsys, ["eval", "--from", str(bad)])
    assert f"{n} shape mismatches" in e and f"... and {n - 5} more" in e and "size mismatch for" not in e
    with pytest.raises(ConfigError) as ei:
        create_model("resnet20", weights=str(trained_run / "model.safetensors"))
    msg = str(ei.value)
    assert "--in-channels" not in msg and "--num-classes" not in msg and "--dataset" in msg
    assert "more" in msg and len(msg) < 1200


def test_a_flag_typo_gets_a_suggestion(trained_run, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["prune", "--from", str(trained_run), "--critrion", "l1"])
    assert ei.value.code == 2
    e = capsys.readouterr().err
    assert e.startswith("prunekit prune: error: unrecognized arguments: --critrion l1") and "--criterion?" in e


def test_lstsq_size_warning_speaks_of_the_data_it_got(caplog):
    import prunekit

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1)).eval()
    lm = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    ids, more = torch.randint(0, 20, (1, 5)), torch.randint(0, 20, (1, 5))
    with caplog.at_level(logging.WARNING):
        prunekit.prune(cnn, torch.randn(1, 1, 4, 4), criterion="l1", ratio=0.5, compensate="lstsq",
                       calib_data=[torch.randn(1, 1, 4, 4) for _ in range(2)])
        cnn_msgs = [r.getMessage() for r in caplog.records if "lstsq compensation" in r.getMessage()]
        caplog.clear()
        prunekit.prune(lm, ids, criterion="l1", ratio=0.5, compensate="lstsq", calib_data=[ids, more])
        lm_msgs = [r.getMessage() for r in caplog.records if "lstsq compensation" in r.getMessage()]
    assert cnn_msgs and all("positions" in m and "text" not in m and "token" not in m for m in cnn_msgs), cnn_msgs
    assert lm_msgs and all("calibration tokens" in m and "calibration text" in m for m in lm_msgs), lm_msgs


# ----------------------------------------------------------------------------------------------- LLM folders
def test_prune_llm_takes_from_and_records_the_tokenizer(llm_dirs, tmp_path, capsys):
    args = ["--calib-text", str(llm_dirs / "t.txt"), "--seq-len", "32", "--calib-samples", "4", "--mlp-ratio",
            "0.5", "--eval-text", str(llm_dirs / "t.txt")]
    assert main(["prune-llm", "--from", str(llm_dirs / "bytes"), *args, "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (m["tokenizer"], m["stage"], m["from"]) == ("bytes", "prune-llm", str(llm_dirs / "bytes"))
    assert main(["prune-llm", "--model", str(llm_dirs / "bytes"), *args, "--out", str(tmp_path / "b")]) == 0
    assert "--model is deprecated, use --from" in capsys.readouterr().out
    e = err(capsys, ["prune-llm", "--from", str(llm_dirs / "v1000"), *args, "--out", str(tmp_path / "c")])
    assert "--tokenizer" in e and "vocab_size is 1000" in e and "bytes" in e


def test_eval_text_without_a_tokenizer_and_vocab_1000_names_tokenizer(llm_dirs, capsys):
    text = str(llm_dirs / "t.txt")
    e = err(capsys, ["eval", "--from", str(llm_dirs / "v1000"), "--text", text, "--seq-len", "32"])
    assert e.startswith("prunekit eval: error: --tokenizer auto:") and "no tokenizer files" in e
    assert main(["eval", "--from", str(llm_dirs / "v1000"), "--text", text, "--seq-len", "32", "--tokenizer",
                 "bytes"]) == 0  # asked for explicitly: allowed, and said
    assert json.loads(capsys.readouterr().out)["tokenizer"] == "bytes"


def test_report_export_and_profile_take_a_model_folder(llm_dirs, tmp_path, capsys):
    folder = tmp_path / "pruned"
    assert main(["prune-llm", "--from", str(llm_dirs / "bytes"), "--calib-text", str(llm_dirs / "t.txt"),
                 "--seq-len", "32", "--calib-samples", "4", "--mlp-ratio", "0.5", "--eval-text",
                 str(llm_dirs / "t.txt"), "--out", str(folder)]) == 0
    ppl = json.loads((folder / "metrics.json").read_text())["ppl_after"]
    assert main(["report", str(folder), str(llm_dirs / "bytes"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"{ppl:.4f}" in md and "prune-llm" in md
    assert main(["profile", "--baseline", str(llm_dirs / "bytes"), "--pruned", str(folder), "--backend", "eager",
                 "--runs", "2", "--warmup", "0", "--rounds", "1", "--no-layers", "--seq-len", "16"]) == 0
    p = json.loads((folder / "profile.json").read_text())
    assert p["pruned"]["params"] < p["baseline"]["params"] and p["seq_len"] == 16
    assert main(["export", "--from", str(folder), "--verify"]) == 0
    onnx = json.loads((folder / "export" / "export.json").read_text())["formats"]["onnx"]
    assert onnx["verify"]["ok"] and (folder / "export" / "model.onnx").is_file()
