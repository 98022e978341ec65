"""``prunekit sparsify``: full run directories, masks that survive a fresh process and a later fine-tune, --permanent,
iterative and gradual schedules, structured-then-2:4, and one clear message per user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import runs
from prunekit.cli.main import main
from prunekit.pipeline.sparsify import REPORT, SparsifyConfig, sparsify_run
from prunekit.pruning.unstructured import MASK, get_mask, masked_layers, nm_violations

SPARSE_FILES = runs.RUN_FILES | {runs.HISTORY, REPORT}
SPARSIFIED = ["features.3", "features.7", "features.10"]  # features.0 (first) and classifier stay dense


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """An untrained width-8 smallcnn run directory on digits (instant; enough for masks, files and round trips)."""
    out = tmp_path_factory.mktemp("unstructured") / "base"
    torch.manual_seed(0)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10, width=8)
    model.prunekit_spec.input = {"kind": "image", "shape": [1, 1, 16, 16]}
    out.mkdir()
    runs.save_model(out, model)
    runs.write_config(out, {"dataset": "digits"})
    runs.write_metrics(out, {"top1": 10.0, "stage": "train"})
    (out / runs.LOG).write_text("")
    return out


def sparsify(base: Path, out: Path, **kw) -> dict:
    return sparsify_run(SparsifyConfig.build({"from": str(base), "out": str(out), **kw}))


def _zeros(model: torch.nn.Module, name: str) -> int:
    return int((model.get_submodule(name).weight == 0).sum())


FRESH = r"""
import json, sys, torch, prunekit

# plain load_model, before anything imported the unstructured package: are the masks re-attached (boolean)?
lazy = [str(b.dtype) for n, b in prunekit.load_model(sys.argv[1]).named_buffers() if n.endswith("weight_mask")]
import prunekit.pruning.unstructured  # registers the "sparsity" load hook
from prunekit.pruning.unstructured import get_mask, masked_layers


def check(run_dir):
  m = prunekit.load_model(run_dir)
  layers = masked_layers(m)
  out = {"layers": sorted(layers), "bool": all(get_mask(l).dtype == torch.bool for l in layers.values()),
         "zero": all(bool((l.weight[~get_mask(l)] == 0).all()) for l in layers.values()),
         "shapes": {n: list(l.weight.shape) for n, l in layers.items()}}
  opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
  torch.manual_seed(0)
  for _ in range(3):
      opt.zero_grad()
      m.train()(torch.randn(4, *prunekit.runs.read_spec(run_dir).input["shape"][1:])).square().mean().backward()
      opt.step()
  out["zero_after_training"] = all(bool((l.weight[~get_mask(l)] == 0).all()) for l in layers.values())
  return out


print(json.dumps({"lazy_hook": bool(lazy) and set(lazy) == {"torch.bool"}, "runs": [check(d) for d in sys.argv[1:]]}))
"""


def fresh_process(*run_dirs: Path) -> dict:
    """Load each run dir in a new Python process and train it a little (one process: imports are slow)."""
    r = subprocess.run([sys.executable, "-c", FRESH, *map(str, run_dirs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- run dirs
@pytest.fixture(scope="module")
def l1_run(base_run) -> Path:
    out = base_run.parent / "l1"
    assert main(["sparsify", "--from", str(base_run), "--method", "l1", "--sparsity", "0.6", "--out", str(out)]) == 0
    return out


def test_oneshot_writes_a_full_run_directory(l1_run):
    out = l1_run
    assert {p.name for p in out.iterdir()} == SPARSE_FILES
    m = json.loads((out / runs.METRICS).read_text())
    assert {"top1", "top5", "test_loss", "macs", "params", "nonzero_params", "sparsity", "model_sparsity",
            "macs_nonzero", "size_dense", "size_csr", "size_bitmask", "size_file"} <= set(m)
    assert m["macs"] == json.loads((out / REPORT).read_text())["macs"]
    report = json.loads((out / REPORT).read_text())
    assert [r["name"] for r in report["layers"]] == SPARSIFIED
    assert set(report["skipped"]) == {"features.0", "classifier"}
    model = runs.load_model(out)  # in this process (the hook is registered by the import above)
    for name in SPARSIFIED:
        w = model.get_submodule(name).weight
        assert _zeros(model, name) == round(0.6 * w.numel())
        assert get_mask(model.get_submodule(name)).dtype == torch.bool


def test_permanent_gives_the_same_outputs_without_mask_buffers(base_run, tmp_path):
    masked, folded = tmp_path / "masked", tmp_path / "folded"
    m1 = sparsify(base_run, masked, method="global", sparsity=0.7)
    m2 = sparsify(base_run, folded, method="global", sparsity=0.7, permanent=True)
    a, b = runs.load_model(masked), runs.load_model(folded)
    assert masked_layers(a) and not masked_layers(b)
    assert not any(k.endswith(MASK) for k in b.state_dict())
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert m2["size_file"] < m1["size_file"] and m2["sparsity"] == m1["sparsity"]
    assert json.loads((folded / runs.SPEC).read_text())["extra"]["sparsity"]["permanent"] is True


def _trained_epoch_wins(monkeypatch) -> None:
    """Make every epoch of a fine-tune beat the start model on val (each val evaluation scores above the last), so
    that the trained weights are the ones kept: these tests are about what training does to masks and zeros, not
    about which candidate val picks (tests/test_splits.py)."""
    from prunekit.train import loop

    real, calls = loop.evaluate, []

    def rising(*args, **kwargs):
        calls.append(1)
        return {**real(*args, **kwargs), "top1": float(len(calls))}

    monkeypatch.setattr(loop, "evaluate", rising)


def test_finetuning_a_permanent_sparse_run_warns_and_records_its_sparsity(base_run, tmp_path, caplog, monkeypatch):
    from prunekit.pipeline.stages import FinetuneConfig, finetune
    from prunekit.report.collect import _method

    _trained_epoch_wins(monkeypatch)

    folded, ft = tmp_path / "folded", tmp_path / "ft"
    sparsify(base_run, folded, method="l1", sparsity=0.5, permanent=True)
    with caplog.at_level("WARNING"):
        m = finetune(FinetuneConfig.build({"from": str(folded), "out": str(ft), "epochs": 1, "lr": 0.05}))
    assert "holds no masks (sparsified with --permanent): fine-tuning fills the zeros in" in caplog.text
    assert m["model_sparsity"] < 0.05 and m["nonzero_params"] > 0.95 * m["params"]  # the zeros are gone, and said
    assert _method([folded]) == "l1 s=0.50" and _method([ft, folded]) == "l1 s=0.50"
    sparsify(base_run, tmp_path / "nm", method="nm", nm="2:8")
    assert _method([tmp_path / "nm"]) == "nm 2:8"


def test_a_later_finetune_stage_keeps_the_masks(base_run, tmp_path, monkeypatch):
    from prunekit.pipeline.stages import FinetuneConfig, finetune

    _trained_epoch_wins(monkeypatch)

    sparse, ft = tmp_path / "sparse", tmp_path / "ft"
    sparsify(base_run, sparse, method="l1", sparsity=0.5)
    finetune(FinetuneConfig.build({"from": str(sparse), "out": str(ft), "epochs": 1, "lr": 0.05}))
    before, after = runs.load_model(sparse), runs.load_model(ft)
    for name in SPARSIFIED:
        mask = get_mask(after.get_submodule(name))
        assert torch.equal(mask, get_mask(before.get_submodule(name)))
        assert torch.count_nonzero(after.get_submodule(name).weight[~mask]) == 0
        assert not torch.equal(after.get_submodule(name).weight, before.get_submodule(name).weight)


# ----------------------------------------------------------------------------------------------- schedules
def test_iterative_and_gradual_reach_the_exact_sparsity(base_run, tmp_path):
    it = sparsify(base_run, tmp_path / "it", method="l1", sparsity=0.8, schedule="iterative", steps=2, epochs=1,
                  lr=0.05)
    assert [r["step"] for r in it["retention"]] == [1, 2]
    assert it["retention"][0]["sparsity"] == pytest.approx(1 - 0.2 ** 0.5, abs=1e-3)
    assert not (tmp_path / "it" / "steps").exists()
    gr = sparsify(base_run, tmp_path / "gr", method="movement", sparsity=0.8, schedule="gradual", epochs=1, lr=0.05)
    for run in ("it", "gr"):
        model = runs.load_model(tmp_path / run)
        for name in SPARSIFIED:
            assert _zeros(model, name) == round(0.8 * model.get_submodule(name).weight.numel()), (run, name)
    assert gr["schedule"] == "gradual" and gr["method"] == "movement"


def test_masks_survive_a_fresh_process_also_after_structured_pruning_then_2to4(base_run, l1_run, tmp_path):
    from prunekit.pruning import prune

    model = runs.load_model(base_run)
    prune(model, torch.randn(1, 1, 16, 16), criterion="l1", ratio=0.5, round_to=4)
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    runs.save_model(pruned, model)
    runs.write_config(pruned, {"dataset": "digits"})
    runs.write_metrics(pruned, {"top1": 10.0, "stage": "prune", "from": str(base_run)})
    (pruned / runs.LOG).write_text("")
    out = tmp_path / "pruned-24"
    m = sparsify(pruned, out, method="nm", nm="2:4")
    assert m["sparsity"] == 0.5
    fresh = fresh_process(l1_run, out)
    plain, got = fresh["runs"]
    assert plain["layers"] == sorted(SPARSIFIED) and plain["bool"] and plain["zero"] and plain["zero_after_training"]
    assert got["bool"] and got["zero"] and got["zero_after_training"]
    assert got["shapes"]["features.3"][0] < 8  # structurally pruned first
    reloaded = runs.load_model(out)
    for name in got["layers"]:
        assert nm_violations(reloaded.get_submodule(name).weight, 2, 4) == 0
    if hasattr(runs, "HOOK_PROVIDERS"):  # runs.load_model imports the hook's module itself (change asked of the lead)
        assert fresh["lazy_hook"]
    elif not fresh["lazy_hook"]:
        pytest.xfail("prunekit.load_model alone does not re-attach masks until runs.py imports the 'sparsity' hook")


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, msg", [
    (["--method", "l1", "--sparsity", "1.5"], "--sparsity (sparsity) = '1.5' is invalid: sparsity is the fraction"),
    (["--method", "nm", "--nm", "4:4"], "need 0 < N < M"),
    (["--method", "magnitud"], "unknown sparsify method 'magnitud'"),
    (["--method", "movement", "--sparsity", "0.5"], "needs a training phase: use --schedule gradual"),
    (["--method", "movement", "--schedule", "gradual"], "needs a training phase"),
    (["--method", "l1", "--schedule", "iterative"], "needs --epochs >= 1"),
    (["--method", "nm", "--schedule", "gradual", "--epochs", "1"], "use --schedule oneshot"),
    (["--method", "kernel", "--nm", "1:4"], "--nm 1:4 does not apply to method 'kernel'"),
    (["--method", "l1", "--pattern-keep", "3"], "--pattern-keep 3 does not apply to method 'l1'"),
])
def test_bad_values_give_one_clear_message(base_run, tmp_path, capsys, args, msg):
    assert main(["sparsify", "--from", str(base_run), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_recipe_structured_prune_then_2to4(base_run, tmp_path):
    from prunekit.pipeline.recipe import STAGES, Recipe, register_stage, run_recipe

    if "sparsify" not in STAGES:  # until the lead registers the stage in pipeline/recipe.py
        register_stage("sparsify", SparsifyConfig, sparsify_run, trains=True)
    recipe = Recipe.build({"out": str(tmp_path / "recipe"), "data": {"dataset": "digits"}, "stages": {
        "baseline": {"from": str(base_run)}, "prune": {"criterion": "l1", "ratio": 0.5, "round_to": 4},
        "sparsify": {"method": "nm", "nm": "2:4", "epochs": 1}}})
    results = run_recipe(recipe)
    m = results["sparsify"]
    assert m["sparsity"] == 0.5 and m["from"].endswith("2-prune") and m["params"] < 4370
    model = runs.load_model(tmp_path / "recipe" / "3-sparsify")
    layers = masked_layers(model)
    assert layers and all(nm_violations(mod.weight, 2, 4) == 0 for mod in layers.values())


def test_an_interrupted_iterative_run_resumes_after_its_last_finished_step(base_run, tmp_path, monkeypatch):
    import prunekit.pipeline.sparsify as cli

    real_fit, phases = cli.fit, []

    def fit(*args, phase="", **kw):
        phases.append(phase)
        if phase == "sparsify-step2" and phases.count(phase) == 1:
            raise KeyboardInterrupt  # killed during the second step's fine-tuning
        return real_fit(*args, phase=phase, **kw)

    monkeypatch.setattr(cli, "fit", fit)
    out = tmp_path / "it"
    kw = dict(method="l1", sparsity=0.75, schedule="iterative", steps=2, epochs=1, lr=0.05)
    with pytest.raises(KeyboardInterrupt):
        sparsify(base_run, out, **kw)
    assert (out / "steps" / "1-done" / runs.WEIGHTS).is_file()
    m = sparsify(base_run, out, resume=True, **kw)
    assert phases == ["sparsify-step1", "sparsify-step2", "sparsify-step2"]  # step 1 was not redone
    model = runs.load_model(out)
    for name in SPARSIFIED:
        assert _zeros(model, name) == round(0.75 * model.get_submodule(name).weight.numel())
    assert m["sparsity"] == pytest.approx(0.75, abs=1e-3) and not (out / "steps").exists()


def test_the_summary_line_gives_the_whole_model_sparsity_too(base_run, tmp_path, capsys):
    assert main(["sparsify", "--from", str(base_run), "--out", str(tmp_path / "s"), "--method", "l1",
                 "--sparsity", "0.5"]) == 0
    m = json.loads((tmp_path / "s" / runs.METRICS).read_text())
    out = capsys.readouterr().out
    assert f"({m['sparsified_layers']} layers; whole model {m['model_sparsity']:.4f})" in out
    assert m["model_sparsity"] < m["sparsity"]  # the first and last layers stay dense
