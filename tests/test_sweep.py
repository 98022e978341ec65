"""``prunekit sweep``: grid keys and values validated before anything runs; a 2 x 2 grid killed after its first point
resumes without rerunning it (one shared baseline, trained once); a failing point is recorded while the others
finish; the Pareto front and the best point meeting the targets; an Optuna search that resumes from its study."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunekit import runs
from prunekit.cli.main import main
from prunekit.errors import ConfigError
from prunekit.measure import count_macs, count_params
from prunekit.models import create_model
from prunekit.pipeline.sweep import Range, collect_results, parse_grid, run_sweep, write_results
from prunekit.report.pareto import pareto_front

DATA = "data: {dataset: digits, batch_size: 256, image_size: 8}\n"
PRUNE = "  prune: {criterion: l1, ratio: 0.4, calib_batches: 2}\n"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """An (untrained) smallcnn run directory on 8 px digits, with a known top-1 of 50%."""
    d = tmp_path_factory.mktemp("base") / "run"
    torch.manual_seed(0)
    model = create_model("smallcnn", in_channels=1, num_classes=10, width=8)
    spec = model.prunekit_spec
    spec.input = {"kind": "image", "shape": [1, 1, 8, 8]}
    runs.save_model(d, model, spec)
    runs.write_config(d, {"dataset": "digits", "data_dir": None, "image_size": 8})
    runs.write_metrics(d, {"top1": 50.0, "top5": 90.0, "macs": count_macs(model, torch.zeros(1, 1, 8, 8)),
                           "params": count_params(model), "stage": "train"})
    (d / runs.LOG).write_text("fixture\n")
    return d


def _recipe(tmp_path: Path, stages: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(f"out: {tmp_path / 'unused'}\n{DATA}stages:\n{stages}")
    return p


@pytest.mark.parametrize("grid, match", [
    (["prune.ration=0.3"], r"--grid 'prune.ration': stage 'prune' has no option 'ration'; did you mean 'ratio'"),
    (["prnue.ratio=0.3"], r"'prnue' is not a stage of the recipe; did you mean 'prune'"),
    (["stages.finetune.lr=0.1"], r"the recipe has no stage 'finetune' \(its stages: baseline, prune\)"),
    (["data.batchsize=8"], r"unknown data key; did you mean 'data.batch_size'"),
    (["prune.out=x"], r"'out' is set by the sweep"),
    (["prune.ratio=0.3,abc"], r"--grid stages.prune.ratio='abc': .*'ratio' = 'abc' is invalid"),
    (["prune.ratio=0.3,1.5"], r"--grid stages.prune.ratio=1.5: .*less than 1"),
    (["prune.criterion=l1,nosuch"], r"--grid stages.prune.criterion='nosuch': .*unknown criterion"),
    (["prune.target_macs=0.5"], r"--grid stages.prune.target_macs=0.5: .*can't provide both `ratio`"),
    (["prune.ratio=0.2:0.6"], r"--grid stages.prune.ratio=0.2:0.6: a range needs --search optuna"),
    (["prune.ratio=0.3", "stages.prune.ratio=0.5"], r"key 'stages.prune.ratio' is given twice|both name"),
], ids=["option", "stage", "absent-stage", "data-key", "out", "type", "range", "criterion", "combination",
        "range-in-grid", "twice"])
def test_bad_grid_keys_and_values_fail_before_anything_runs(tmp_path, grid, match):
    recipe = _recipe(tmp_path, "  baseline: {model: smallcnn, epochs: 1}\n" + PRUNE)
    with pytest.raises(ConfigError, match=match):
        run_sweep(recipe, grid, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_cli_names_the_bad_key_and_exits_2(tmp_path, capsys):
    recipe = _recipe(tmp_path, "  baseline: {model: smallcnn, epochs: 1}\n" + PRUNE)
    assert main(["sweep", str(recipe), "--grid", "prune.ratio=0.3,fast", "--out", str(tmp_path / "s")]) == 2
    assert "--grid stages.prune.ratio='fast'" in capsys.readouterr().err
    assert main(["sweep", str(recipe), "--grid", "prune.ratio=0.3", "--targets", "macs=2"]) == 2
    assert "--targets macs=2" in capsys.readouterr().err


def test_parse_grid_values_and_ranges():
    g = parse_grid(["prune.ratio=0.3,0.5,prune.criterion=l1,random", "finetune.lr=1e-3:1e-1:log", "seed=1:3",
                    "finetune.kd=true,false", "prune.round_to=null,8"])
    assert g == {"prune.ratio": [0.3, 0.5], "prune.criterion": ["l1", "random"],
                 "finetune.lr": [Range(1e-3, 1e-1, log=True)], "seed": [Range(1, 3)], "finetune.kd": [True, False],
                 "prune.round_to": [None, 8]}
    assert g["seed"][0].integer and not g["finetune.lr"][0].integer


def test_pareto_front_ties_and_dominance():
    pts = [(50, 90.0), (40, 89.0), (30, 85.0), (45, 86.0), (60, 90.0), (40, 89.0), (30, 80.0)]
    assert pareto_front(pts) == [2, 1, 5, 0]  # by cost; the exact twin (40, 89) stays, (60, 90) is dominated
    assert pareto_front([]) == []


def _fake_point(out: Path, index: int, name: str, settings: dict, status: str, macs: float | None = None,
                top1: float | None = None, base: Path | None = None) -> None:
    d = out / "points" / f"{index:03d}-{name}"
    (d / "1-prune").mkdir(parents=True)
    if macs is not None:
        (d / "1-prune" / runs.METRICS).write_text(json.dumps({"top1": top1, "top5": 99.0, "macs": macs,
                                                              "params": macs / 10}))
    (d / "point.json").write_text(json.dumps({
        "point": d.name, "index": index, "settings": settings, "status": status, "final_dir": "1-prune",
        "baseline_dir": str(base), "error": "boom (exit code 2)" if status == "failed" else None, "runs": 1}))


def test_pareto_front_and_best_point_on_results(tmp_path):
    out = tmp_path / "sweep"
    base = tmp_path / "base"
    base.mkdir()
    (base / runs.METRICS).write_text(json.dumps({"top1": 90.5, "macs": 100.0, "params": 10.0}))
    # (MACs, top-1): A on the front, B on it and at exactly the 1.5-point drop limit, C on it but drops 5.5 points,
    # D dominated by B, E ties A's top-1 at higher MACs (dominated), F failed
    for i, (n, macs, top1) in enumerate([("A", 50, 90.0), ("B", 40, 89.0), ("C", 30, 85.0), ("D", 45, 86.0),
                                        ("E", 60, 90.0)], 1):
        _fake_point(out, i, n, {"stages.prune.ratio": i / 10}, "ok", macs, top1, base)
    _fake_point(out, 6, "F", {"stages.prune.ratio": 0.6}, "failed", base=base)
    res = write_results(out)
    names = {r["point"][4:]: r for r in res.points}
    assert res.front == ["003-C", "002-B", "001-A"]
    assert res.best["point"] == "001-A"  # A, B, E meet >= 40% cut and <= 1.5 drop; A and E tie, A has fewer MACs
    assert [n for n, r in names.items() if r["meets_targets"]] == ["A", "B", "E"]
    assert names["B"]["top1_drop"] == pytest.approx(1.5) and names["B"]["macs_reduction"] == pytest.approx(0.6)
    assert names["F"]["status"] == "failed" and names["F"]["error"].startswith("boom") and not names["F"]["pareto"]
    assert collect_results(out, {"macs": 0.65, "drop": 6}).best["point"] == "003-C"
    assert collect_results(out, {"macs": 0.8}).best is None
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["point"] for r in rows] == [f"00{i}-{n}" for i, n in enumerate("ABCDEF", 1)]
    assert rows[0]["stages.prune.ratio"] == "0.1" and rows[0]["pareto"] == "True" and rows[3]["pareto"] == "False"
    assert json.loads((out / "results.json").read_text())["best"] == "001-A"
    assert (out / "pareto.png").stat().st_size > 0


def test_failing_point_is_recorded_and_the_others_complete(tmp_path, base_run):
    recipe = _recipe(tmp_path, f"  prune: {{from: {base_run}, criterion: l1, ratio: 0.5, calib_batches: 2}}\n")
    out = tmp_path / "sweep"
    # max_ratio 0.1 caps every group below the asked ratio 0.5: the engine refuses at run time, not at validation
    res = run_sweep(recipe, {"prune.max_ratio": [0.9, 0.1]}, out, jobs=2, targets={})
    ok, bad = res.points
    assert ok["status"] == "ok" and ok["macs"] < ok["baseline_macs"] and ok["baseline_top1"] == 50.0
    assert ok["top1_drop"] == pytest.approx(50.0 - ok["top1"])
    assert bad["status"] == "failed" and "cannot be reached" in bad["error"] and "exit code 2" in bad["error"]
    assert "cannot be reached" in (out / bad["dir"] / "output.log").read_text()
    assert res.best["point"] == ok["point"] and res.front == [ok["point"]]
    # a rerun skips the finished point (and here, without retry_failed, the failed one); another recipe is refused
    res2 = run_sweep(recipe, {"prune.max_ratio": [0.9, 0.1]}, out, targets={}, retry_failed=False)
    assert [p["runs"] for p in res2.points] == [1, 1] and res2.points[1]["error"] == bad["error"]
    with pytest.raises(ConfigError, match=r"different recipe \(differs at: stages.prune.calib_batches\)"):
        run_sweep(recipe, {"prune.max_ratio": [0.9]}, out, overrides={"stages.prune.calib_batches": 3})


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills processes and reads /proc")
def test_grid_killed_after_first_point_resumes_without_rerunning(tmp_path):
    recipe = _recipe(tmp_path, "  baseline: {model: smallcnn, model_kwargs: {width: 8}, epochs: 1, lr: 0.05}\n"
                     + PRUNE)
    out = tmp_path / "sweep"
    grid = ["prune.ratio=0.3,0.5,prune.criterion=l1,random"]
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", "sweep", str(recipe), "--grid", *grid, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = out / "points" / "001-ratio=0.3,criterion=l1", out / "points" / "002-ratio=0.3,criterion=random"
    deadline = time.monotonic() + 300
    while True:  # kill the sweep (SIGKILL) once point 1 is done and point 2 is running
        info = json.loads((second / "point.json").read_text()) if (second / "point.json").is_file() else {}
        if info.get("status") == "running" and info.get("pid"):
            break
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before point 2"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _alive(info["pid"]):  # the running point dies with the sweep instead of writing on as an orphan
        assert time.monotonic() < deadline, "the point's process outlived the killed sweep"
        time.sleep(0.1)
    assert json.loads((first / "point.json").read_text())["status"] == "ok"
    (baseline,) = (out / "baselines").iterdir()
    stamps = {p: p.stat().st_mtime_ns for p in (first / "1-prune" / runs.METRICS, baseline / "1-baseline" /
                                                runs.WEIGHTS)}

    res = run_sweep(recipe, grid, out, jobs=2)
    assert [p["status"] for p in res.points] == ["ok"] * 4
    assert {p.stat().st_mtime_ns for p in stamps} == set(stamps.values())  # point 1 and the baseline not redone
    assert [p["runs"] for p in res.points] == [1, 2, 1, 1]  # point 2 was interrupted, so it ran again
    assert len(list((out / "baselines").iterdir())) == 1  # one baseline shared by all four points
    assert {p["baseline_top1"] for p in res.points} == {runs.read_metrics(baseline / "1-baseline")["top1"]}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["stages.prune.ratio"], r["stages.prune.criterion"]) for r in rows) == [
        ("0.3", "l1"), ("0.3", "random"), ("0.5", "l1"), ("0.5", "random")]
    assert all(float(r["macs"]) < float(r["baseline_macs"]) for r in rows)
    assert set(res.front) <= {p["point"] for p in res.points} and (out / "pareto.png").is_file()


def test_optuna_search_resumes_from_its_study(tmp_path, base_run):
    optuna = pytest.importorskip("optuna")
    recipe = _recipe(tmp_path, f"  prune: {{from: {base_run}, criterion: l1, ratio: 0.4, calib_batches: 2}}\n")
    out = tmp_path / "search"
    storage = f"sqlite:///{out / 'study.db'}"
    grid = ["prune.ratio=0.2:0.6", "prune.criterion=l1,random"]
    kw = dict(search="optuna", objectives=("top1", "macs"), jobs=2)
    res = run_sweep(recipe, grid, out, trials=1, **kw)
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] and len(study.directions) == 2
    (p0,) = res.points
    assert p0["trials"] == [0] and 0.2 <= p0["settings"]["stages.prune.ratio"] <= 0.6
    assert study.trials[0].values == pytest.approx([p0["top1"], p0["macs"]])
    # as if the sweep had been killed while running a second trial: the trial is left RUNNING in the study
    t = study.ask()
    killed = {"stages.prune.ratio": t.suggest_float("stages.prune.ratio", 0.2, 0.6),
              "stages.prune.criterion": t.suggest_categorical("stages.prune.criterion", ["l1", "random"])}
    res2 = run_sweep(recipe, grid, out, trials=2, **kw)  # resumes: that trial's settings run again, nothing else
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].params == killed and study.user_attrs["requeued"] == [1]
    assert [p["runs"] for p in res2.points] == [1, 1] and res2.points[1]["trials"] == [2]
    assert res2.points[1]["settings"] == killed and res2.points[0]["point"] == p0["point"]
