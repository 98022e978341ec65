"""``prunekit compare-paper``: the shipped VBP table, our runs laid over it, deltas, files, the CLI, bad inputs.

The run directories are made up (metrics.json and model.json only: the comparison reads nothing else).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunekit.errors import ConfigError, RunDirError
from prunekit.report.paper import PAPERS, compare_with_paper, delta_table, load_paper, write_comparison

SPEC = {"format": 1, "name": "timm:deit_tiny_patch16_224", "kwargs": {}, "input": {}, "modified": {}}


def run(d: Path, **metrics) -> Path:
    d.mkdir(parents=True)
    (d / "model.json").write_text(json.dumps(SPEC))
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    base = run(tmp_path / "base", stage="train", top1=80.0, macs=1000, params=100, dataset="imagenet")
    p25 = run(tmp_path / "p25", stage="prune", ratio=0.25, top1=60.0, macs=800, params=80, criterion="variance",
              **{"from": str(base)})
    ft25 = run(tmp_path / "ft25", stage="finetune", top1=78.0, macs=800, params=80, **{"from": str(p25)})
    p40 = run(tmp_path / "p40", stage="prune", ratio=0.4, top1=40.0, macs=700, params=70, **{"from": str(base)})
    return {"base": base, "p25": p25, "ft25": ft25, "p40": p40}


@pytest.fixture
def table(tmp_path) -> Path:
    f = tmp_path / "table.json"
    f.write_text(json.dumps({"source": "made up for a test", "rows": [
        {"ratio": 0.25, "top1_pruned": 36.01, "top1": 70.58, "macs": 1.008e9, "params": 4.576e6}]}))
    return f


def test_shipped_table_has_only_the_given_figures():
    t = PAPERS.get("vbp-deit-tiny")
    assert t.base == {"top1": 72.02, "macs": 1.26e9, "params": 5.72e6}
    assert "2507.12988" in t.citation and t.url.endswith("2507.12988")
    assert [r["ratio"] for r in t.rows] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    # no per-ratio value is shipped that could not be verified: they are all left empty
    assert not t.has_values and all(r[k] is None for r in t.rows for k in ("top1_pruned", "top1", "macs", "params"))
    assert "not transcribed" in t.provenance


def test_runs_over_the_table_with_deltas(dirs, table):
    cmp = compare_with_paper("vbp-deit-tiny", [dirs["ft25"], dirs["p25"], dirs["p40"], dirs["base"]], table)
    assert [r["run"] for r in cmp.rows] == ["p25", "ft25", "p40"]  # by ratio, prune-only first
    assert len(cmp.skipped) == 1 and "base" in cmp.skipped[0] and "no prune stage" in cmp.skipped[0]
    ft = cmp.rows[1]
    assert (ft["ratio"], ft["top1_pruned"], ft["top1"], ft["baseline_top1"]) == (0.25, 60.0, 78.0, 80.0)
    assert ft["retention"] == pytest.approx(0.75) and ft["recovery"] == pytest.approx(0.975)
    assert ft["macs_reduction"] == pytest.approx(0.2) and ft["params_reduction"] == pytest.approx(0.2)
    assert ft["paper_retention"] == pytest.approx(36.01 / 72.02)
    assert ft["paper_recovery"] == pytest.approx(70.58 / 72.02)
    assert ft["paper_macs_reduction"] == pytest.approx(0.2) and ft["paper_params_reduction"] == pytest.approx(0.2)
    assert ft["delta_retention"] == pytest.approx(0.75 - 0.5)
    assert ft["delta_recovery"] == pytest.approx(0.975 - 70.58 / 72.02)
    assert cmp.rows[0]["recovery"] is None and cmp.rows[0]["delta_recovery"] is None  # prune-only run
    assert cmp.rows[2]["paper_retention"] is None and cmp.rows[2]["delta_retention"] is None  # 0.4: no value given
    assert cmp.caveats == []  # DeiT on ImageNet, paper values present
    headers, cells = delta_table(cmp)
    assert headers[:5] == ["run", "ratio", "retention ours %", "paper %", "delta"]
    assert cells[1][:5] == ["ft25", "0.25", "75.0", "50.0", "+25.0"]


def test_caveats_without_values_or_on_other_data(tmp_path):
    base = run(tmp_path / "b", stage="train", top1=96.0, macs=10, params=10, dataset="digits")
    spec = {**SPEC, "name": "resnet20"}
    (base / "model.json").write_text(json.dumps(spec))
    p = run(tmp_path / "p", stage="prune", ratio=0.3, top1=50.0, macs=5, params=5, **{"from": str(base)})
    (p / "model.json").write_text(json.dumps(spec))
    cmp = compare_with_paper("vbp-deit-tiny", [p])
    assert len(cmp.caveats) == 2
    assert "resnet20 on digits" in cmp.caveats[0] and "--table" in cmp.caveats[1]


def test_files(dirs, table, tmp_path):
    cmp = compare_with_paper("vbp-deit-tiny", [dirs["p25"], dirs["ft25"]], table)
    files = write_comparison(cmp, tmp_path / "out")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["md"].read_text()
    assert "arXiv:2507.12988" in md and "made up for a test" in md and "| ft25 | 0.25 | 75.0 | 50.0 | +25.0 |" in md
    data = json.loads(files["json"].read_text())
    assert data["paper"]["base"]["top1"] == 72.02 and [r["run"] for r in data["runs"]] == ["p25", "ft25"]


def test_cli(dirs, table, tmp_path, capsys):
    from prunekit.cli.main import main

    out = tmp_path / "cmp"
    assert main(["compare-paper", "--paper", "vbp-deit-tiny", str(dirs["p25"]), str(dirs["ft25"]), "--table",
                 str(table), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "72.02%" in text and "2507.12988" in text and "ft25" in text and "+25.0" in text
    assert (out / "paper_comparison.md").is_file()
    assert main(["compare-paper", "--paper", "vbp-deit-small", str(dirs["p25"])]) == 2
    err = capsys.readouterr().err
    assert "unknown paper 'vbp-deit-small'" in err and "vbp-deit-tiny" in err


def test_bad_inputs(dirs, tmp_path):
    with pytest.raises(RunDirError, match="no run could be compared"):
        compare_with_paper("vbp-deit-tiny", [dirs["base"]])
    with pytest.raises(RunDirError, match="does not exist"):
        compare_with_paper("vbp-deit-tiny", [tmp_path / "nope"])
    with pytest.raises(ConfigError, match="at least one"):
        compare_with_paper("vbp-deit-tiny", [])
    orphan = run(tmp_path / "orphan", stage="prune", ratio=0.2, top1=1.0, macs=1, params=1, **{"from": "/gone"})
    with pytest.raises(RunDirError, match="no baseline"):
        compare_with_paper("vbp-deit-tiny", [orphan])
    bad = tmp_path / "bad.json"
    for content, msg in (("{", "not valid JSON"), ('{"rows": [{"top1": 3}]}', "must be an object with a 'ratio'"),
                         ('{"rows": [{"ratio": 2}]}', r"in \(0, 1\)"),
                         ('{"rows": [{"ratio": 0.1, "acc": 3}]}', "unknown key 'acc'"),
                         ('{"rows": [{"ratio": 0.1, "top1": "high"}]}', "not a number"),
                         ('{"base": {"flops": 1}}', "base key 'flops'"), ('{"tables": []}', "keys among")):
        bad.write_text(content)
        with pytest.raises(ConfigError, match=msg):
            load_paper("vbp-deit-tiny", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_paper("vbp-deit-tiny", tmp_path / "missing.json")
