"""One registry of commands and stages, one skeleton for every stage over run directories."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prunekit import runs
from prunekit.cli.main import _discover, build_parser, main
from prunekit.pipeline.commands import COMMANDS, STAGES, Command, load_builtin
from prunekit.pipeline.recipe import Recipe
from prunekit.pipeline.skeleton import stage_run

PKG = Path(__file__).resolve().parents[1] / "src" / "prunekit"
_discover()


def test_recipe_stages_are_cli_commands_of_the_same_registry():
    load_builtin()
    by_stage = {s: STAGES.get(s).name for s in STAGES.names()}
    assert by_stage == {"baseline": "train", "eval": "eval", "finetune": "finetune", "pat": "pat", "prune": "prune",
                        "quantize": "quantize", "sparse": "sparse-train", "sparsify": "sparsify"}
    for stage, name in by_stage.items():
        assert STAGES.get(stage) is COMMANDS.get(name)  # one entry, seen by two names
        assert STAGES.get(stage).run.__module__.startswith("prunekit.pipeline.")
    not_stages = {n for n in COMMANDS.names() if COMMANDS.get(n).stage is None}
    assert {"report", "graph", "models", "datasets", "export", "profile", "sensitivity", "prune-llm"} <= not_stages


def test_the_parser_has_one_sub_command_per_entry_and_every_stage_prints():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == COMMANDS.names()
    for name in COMMANDS.names():
        cmd = COMMANDS.get(name)
        # a pipeline entry gets its printer from cli/; a CLI-only command prints in its own function
        assert cmd.show is not None or cmd.run.__module__.startswith("prunekit.cli."), name


def test_a_name_registers_once(tmp_path):
    entry = COMMANDS.get("prune")
    with pytest.raises(ValueError, match="already registered"):
        COMMANDS.register("prune")(entry)
    from prunekit.pipeline.commands import add

    with pytest.raises(ValueError, match="stage 'prune' is already registered"):
        add(Command("prune-again", entry.config, entry.run, stage="prune"))
    with pytest.raises(ValueError, match="unknown stage"):
        Recipe.build({"out": str(tmp_path), "stages": {"prun": {}}})


def test_only_the_pipeline_orchestrates_run_directories():
    """The prologue is written once: ``prepare_out_dir`` is called only by the skeleton, and run logs are opened
    only in pipeline/ (the skeleton, and export's log beside the source run)."""
    calls: dict[str, list[str]] = {"prepare_out_dir(": [], "run_log(": []}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        text = path.read_text()
        for call in calls:
            if re.search(rf"\bruns\.{re.escape(call)}", text):
                calls[call].append(rel)
    assert sorted(calls["prepare_out_dir("]) == ["pipeline/skeleton.py"]
    assert sorted(calls["run_log("]) == ["pipeline/export.py", "pipeline/skeleton.py"]


@pytest.mark.parametrize("stage", ["pat", "sparse-train", "finetune", "prune", "sparsify"])
def test_every_stage_refuses_out_equal_to_from(trained_run, stage, capsys):
    assert main([stage, "--from", str(trained_run), "--out", str(trained_run)]) == 2
    err = capsys.readouterr().err
    assert "is the same folder as --from; choose another --out" in err
    assert sorted(p.name for p in trained_run.iterdir()) == sorted(runs.RUN_FILES | {runs.HISTORY})


def test_stage_run_prologue_and_epilogue(trained_run, tmp_path):
    from prunekit.pipeline.stages import FinetuneConfig

    out = tmp_path / "ft"
    cfg = FinetuneConfig.build({"from": str(trained_run), "out": str(out), "seed": 3})
    with stage_run(cfg, "finetune", resumable=True) as run:
        assert run.out == out and run.source == Path(trained_run) and run.device == "cpu"
        assert run.data["dataset"] == runs.read_config(trained_run)["dataset"]  # inherited from the source run
        assert run.before == runs.read_metrics(trained_run) and run.spec.name == "smallcnn"
        assert (out / "log.txt").is_file()
        (out / runs.CKPT).write_text("checkpoint")
        runs.write_metrics(out, {"top1": 1.0})
    assert not (out / runs.CKPT).exists()  # finish_run: the resume checkpoint goes once the stage is done
    with pytest.raises(Exception, match="already holds a run"), stage_run(cfg, "finetune", resumable=True):
        pass  # a run with its metrics is not clobbered
