"""``prunekit profile`` with int8 runs: dense / pruned x float32 / int8 on each runtime (and eager float32) timed
side by side at two batch sizes, with the spread across rounds; the table printed, profile.json's rows, and the
report's bar chart; int8 directories that do not fit are refused by flag."""

from __future__ import annotations

import json
import logging

import pytest

from prunekit.cli.main import main
from prunekit.errors import ConfigError
from prunekit.measure.profile import PROFILE_FILE

pytest.importorskip("onnxruntime")
FAST = ["--runs", "4", "--warmup", "1", "--threads", "1", "--no-layers", "--deploy-runs", "4", "--rounds", "2",
        "--backend", "eager"]


@pytest.fixture(autouse=True)
def _fresh_console_logging():
    yield
    logger = logging.getLogger("prunekit")
    for h in [h for h in logger.handlers if getattr(h, "_prunekit_console", False)]:
        logger.removeHandler(h)


@pytest.fixture(scope="module")
def four(trained_run, tmp_path_factory):
    """The trained smallcnn, a pruned copy, and an ONNX Runtime int8 run of each (quantize stage)."""
    from prunekit.pipeline.quantize import QuantizeStageConfig, quantize_run

    root = tmp_path_factory.mktemp("deploy")
    assert main(["prune", "--from", str(trained_run), "--target-macs", "0.5", "--out", str(root / "pruned")]) == 0
    dirs = {"base": trained_run, "pruned": root / "pruned"}
    for name in ("base", "pruned"):
        quantize_run(QuantizeStageConfig.build({"from": str(dirs[name]), "out": str(root / f"{name}-int8"),
                                                "calib_batches": 2, "eval_batches": 1, "latency_runs": 0,
                                                "threads": 1}))
        dirs[f"{name}-int8"] = root / f"{name}-int8"
    return dirs


def test_four_variants_side_by_side(four, tmp_path, capsys):
    out = tmp_path / "profile.json"
    argv = ["profile", "--baseline", str(four["base"]), "--pruned", str(four["pruned"]), "--baseline-int8",
            str(four["base-int8"]), "--pruned-int8", str(four["pruned-int8"]), "--out", str(out), *FAST]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "deployment: dense / pruned, float32 / int8" in text
    assert "pruned  int8       onnxruntime" in text and "batch 8" in text
    rows = json.loads(out.read_text())["deployment"]["rows"]
    kinds = {(r["model"], r["precision"], r["runtime"]) for r in rows}
    assert kinds == {("dense", "float32", "eager"), ("pruned", "float32", "eager"),
                     ("dense", "float32", "onnxruntime"), ("pruned", "float32", "onnxruntime"),
                     ("dense", "int8", "onnxruntime"), ("pruned", "int8", "onnxruntime")}
    assert sorted({r["batch"] for r in rows}) == [1, 8] and len(rows) == 12
    for r in rows:
        assert r["runs"] == 4 and 0 < r["round_min_ms"] <= r["round_max_ms"]
        ref = next(o for o in rows if (o["model"], o["precision"], o["runtime"], o["batch"]) ==
                   ("dense", "float32", r["runtime"], r["batch"]))
        assert r["speedup"] == pytest.approx(ref["median_ms"] / r["median_ms"])
    int8 = [r for r in rows if r["precision"] == "int8"]
    assert all(r["file"].endswith("model_int8.onnx") for r in int8)


def test_int8_run_given_as_pruned_counts_itself(four, tmp_path):
    out = tmp_path / "p.json"
    assert main(["profile", "--baseline", str(four["base"]), "--pruned", str(four["pruned-int8"]), "--out", str(out),
                 "--deploy-batches", "1", *FAST]) == 0
    rows = json.loads(out.read_text())["deployment"]["rows"]
    assert {(r["model"], r["precision"], r["runtime"]) for r in rows} == {
        ("dense", "float32", "eager"), ("pruned", "float32", "eager"), ("pruned", "float32", "onnxruntime"),
        ("pruned", "int8", "onnxruntime")}
    assert all(r["speedup"] is None for r in rows if r["runtime"] == "onnxruntime")  # no dense on ORT to compare


def test_no_int8_run_no_deployment_table(four, tmp_path):
    out = tmp_path / "p.json"
    assert main(["profile", "--baseline", str(four["base"]), "--pruned", str(four["pruned"]), "--out", str(out),
                 *FAST]) == 0
    assert "deployment" not in json.loads(out.read_text())


def test_int8_dirs_that_do_not_fit_are_refused(four, tmp_path):
    import shutil

    from prunekit.pipeline.profile import int8_runs

    with pytest.raises(ConfigError, match="--pruned-int8 .* is not an int8 run directory"):
        int8_runs("--pruned-int8", four["pruned"], [four["base"]])
    with pytest.raises(ConfigError, match="--pruned-int8 .* parameters"):
        int8_runs("--pruned-int8", four["pruned"], [four["base-int8"]])
    again = shutil.copytree(four["base-int8"], tmp_path / "again")
    with pytest.raises(ConfigError, match="two onnxruntime runs"):
        int8_runs("--baseline-int8", four["base"], [four["base-int8"], again])


def test_report_draws_the_deployment_bars(four, tmp_path):
    from prunekit.report import make_report

    prof = four["pruned-int8"] / PROFILE_FILE
    assert main(["profile", "--baseline", str(four["base-int8"]), "--pruned", str(four["pruned-int8"]),
                 "--deploy-batches", "1", *FAST]) == 0
    assert prof.is_file()
    res = make_report([four["pruned-int8"]], tmp_path / "report")
    assert "deployment" in res.figures and res.figures["deployment"].stat().st_size > 1000
    html, md = res.html.read_text(), res.markdown.read_text()
    assert "Deployment latency of" in html and "deployment-1.png" in md
    assert "| pruned | int8 | onnxruntime | 1 |" in md and "| dense | float32 | eager | 1 |" in md


def test_demo_deployment_names_each_runtime(four, tmp_path):
    """The demo's last step: baseline and pruned on eager PyTorch and ONNX Runtime float32 / int8, side by side."""
    from rich.console import Console

    from prunekit.cli.demo import _deployment_table
    from prunekit.pipeline.demo import deployment

    d = deployment(four["base"], four["pruned"], tmp_path / "deploy", latency_runs=4, threads=1)
    assert (tmp_path / "deploy" / "pruned" / "model_int8.onnx").is_file()
    assert set(d["latency_reduction"]) == {"eager float32", "onnxruntime float32", "onnxruntime int8"}
    ms = {(r["model"], r["runtime"], r["precision"]): r["median_ms"] for r in d["rows"]}
    assert d["latency_reduction"]["onnxruntime int8"] == pytest.approx(
        1 - ms[("pruned", "onnxruntime", "int8")] / ms[("dense", "onnxruntime", "int8")])
    assert all(0 <= v <= 100 for a in d["accuracy"].values() for v in a.values())
    console = Console(record=True, width=160)
    console.print(_deployment_table(d))
    text = console.export_text()
    assert "eager PyTorch" in text and "ONNX Runtime" in text and "int8" in text and "faster than the baseline" in text
