"""``prunekit report``: run directories in, a summary table, report.html/report.md and PNGs out.

The run directories are made here (a tiny smallcnn, pruned with the engine, weights zeroed by hand), with metrics
chosen by the test, so that every number in the table can be checked against metrics.json.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import runs
from prunekit.errors import ConfigError, RunDirError
from prunekit.measure import count_macs, count_params
from prunekit.pruning.structured import prune
from prunekit.report import SECTIONS, collect_runs, make_report, pareto_front, parse_targets
from prunekit.report.table import HEADERS, fmt_cell, text_table
from prunekit.report.targets import describe_targets, missed_targets
from prunekit.report.weights import layer_channels, scan_weights

X = torch.randn(1, 1, 16, 16)
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="120pt" height="40pt" viewBox="0 0 120 40">'
       '<rect x="2" y="2" width="116" height="36" fill="#fde8c8" stroke="black"/>'
       '<text x="10" y="25" font-size="12">conv1 group</text></svg>')


def make_run(d: Path, model: torch.nn.Module, metrics: dict, history: list[dict] | None = None) -> Path:
    d.mkdir(parents=True)
    runs.save_model(d, model)
    runs.write_config(d, {"made_by": "test_report"})
    runs.write_metrics(d, {"macs": count_macs(model, X), "params": count_params(model), "dataset": "digits",
                           **metrics})
    (d / runs.LOG).write_text("test\n")
    for row in history or []:
        runs.append_history(d, row)
    return d


def hist(phase: str, top1s: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "phase": phase, "train_loss": 2.0 / (i + 1), "val_loss": 1.0 / (i + 1), "top1": t,
             "top5": 99.0, "lr": 0.1, "seconds": 1.0} for i, t in enumerate(top1s)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """base (train) -> pruned (l1, ratio 0.5) -> tuned (finetune, profiled); base -> sparse (half the conv weights
    zeroed); orphan (its `from` is gone)."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    base_model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10, width=8)
    base = make_run(root / "base", base_model, {"top1": 91.25, "top5": 99.5, "val_loss": 0.31, "stage": "train"},
                    hist("train", [40.0, 80.0, 91.25]))
    (base / "graph.svg").write_text(SVG)
    pruned_model = copy.deepcopy(base_model)
    prune(pruned_model, X, "l1", ratio=0.5)
    pruned = make_run(root / "pruned", pruned_model, {"top1": 40.5, "top5": 80.0, "stage": "prune", "ratio": 0.5,
                                                       "criterion": "l1", "scope": "global", "from": str(base)})
    tuned = make_run(root / "tuned", pruned_model, {"top1": 90.5, "top5": 99.0, "stage": "finetune",
                                                     "from": str(pruned), "latency_ms": 0.8},
                     hist("finetune", [85.0, 90.5]))
    macs_red = 1 - count_macs(pruned_model, X) / count_macs(base_model, X)
    (tuned / "profile.json").write_text(json.dumps({
        "macs_reduction": macs_red, "latency_reduction": {"eager": 0.3, "onnxruntime": None},
        "backends": {"eager": {"verdict": "eager: test verdict"}, "onnxruntime": {"error": "not installed"}}}))
    sparse_model = copy.deepcopy(base_model)
    with torch.no_grad():
        for m in sparse_model.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight.flatten()
                w[w.abs().argsort()[: w.numel() // 2]] = 0  # the smaller half of every conv weight
    sparse = make_run(root / "sparse", sparse_model, {"top1": 85.0, "top5": 98.0, "stage": "sparse",
                                                       "from": str(base)})
    orphan = make_run(root / "orphan", pruned_model, {"top1": 88.0, "stage": "finetune",
                                                       "from": str(root / "deleted")})
    (base / "sensitivity").mkdir()
    (base / "sensitivity" / "sensitivity.json").write_text(json.dumps({
        "format": 1, "criterion": "l1", "ratios": [0.3, 0.6], "baseline": {"top1": 91.25}, "samples": 100,
        "groups": [
            {"name": "fragile_layer", "layers": ["a", "b"], "regex": "a|b", "channels": 8, "mean_drop": 30.0,
             "results": [{"ratio": 0.3, "top1": 71.25, "drop": 20.0}, {"ratio": 0.6, "top1": 51.25, "drop": 40.0}]},
            {"name": "robust_layer", "layers": ["c"], "regex": "c", "channels": 16, "mean_drop": 0.5,
             "results": [{"ratio": 0.3, "top1": 91.25, "drop": 0.0}, {"ratio": 0.6, "top1": 90.25, "drop": 1.0}]}]}))
    return {"base": base, "pruned": pruned, "tuned": tuned, "sparse": sparse, "orphan": orphan, "root": root}


@pytest.fixture(scope="module")
def report(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return make_report([tree["pruned"], tree["tuned"], tree["sparse"]], out)


class _Page(HTMLParser):
    """Headings, image sources/attributes and table cells of a page."""

    def __init__(self):
        super().__init__()
        self.h2, self.imgs, self.tables, self.scripts = [], [], [], 0
        self.body_attrs: dict = {}
        self._in, self._cell, self._row = None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._in = "h2"
            self.h2.append("")
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            self.scripts += 1
        elif tag == "body":
            self.body_attrs = a
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._in == "h2":
            self.h2[-1] += data
        if self._cell is not None:
            self._cell += data


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


# ------------------------------------------------------------------------------------------------ the report
def test_files_sections_and_self_contained(report, tree):
    assert [r.label for r in report.records] == ["base", "pruned", "tuned", "sparse"]  # the baseline is added
    assert report.records[0].added and report.records[0].is_baseline
    page = parse(report.html.read_text())
    assert page.h2 == [title for _, title in SECTIONS]
    assert page.scripts == 0
    assert page.imgs and all(i["src"].startswith("data:image/") for i in page.imgs)
    md = report.markdown.read_text()
    assert all(f"## {title}" in md for _, title in SECTIONS)
    for key in ("accuracy", "channels", "sparsity", "curves", "latency", "magnitudes", "sensitivity"):
        assert report.figures[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert f"]({report.figures[key].name})" in md, key
    assert report.figures["graph"].read_text() == SVG


def test_table_numbers_equal_metrics(report, tree):
    base = json.loads((tree["base"] / "metrics.json").read_text())
    for rec in report.records:
        m = json.loads((rec.dir / "metrics.json").read_text())
        assert (rec.row["top1"], rec.row["top5"], rec.row["macs"], rec.row["params"]) == \
            (m["top1"], m["top5"], m["macs"], m["params"])
        assert rec.row["top1_drop"] == pytest.approx(base["top1"] - m["top1"], abs=1e-12)
        assert rec.row["macs_reduction"] == pytest.approx(1 - m["macs"] / base["macs"], abs=1e-12)
        assert rec.row["params_reduction"] == pytest.approx(1 - m["params"] / base["params"], abs=1e-12)
    tuned = next(r for r in report.records if r.label == "tuned")
    assert tuned.row["latency_ms"] == 0.8 and tuned.row["latency_reduction"] == 0.3  # profile.json wins
    # the HTML summary table shows exactly these numbers, formatted
    headers, cells = text_table([r.row for r in report.records])
    summary = parse(report.html.read_text()).tables[0]
    assert summary[0] == headers and summary[1:] == cells
    col = {h: i for i, h in enumerate(headers)}
    for rec, row in zip(report.records, summary[1:]):
        m = json.loads((rec.dir / "metrics.json").read_text())
        assert row[col[HEADERS["top1"]]] == f"{m['top1']:.2f}"
        assert row[col[HEADERS["macs"]]] == fmt_cell("macs", m["macs"])
    assert "| " + " | ".join(cells[2]) + " |" in report.markdown.read_text()


def test_goals_failures_and_sensitivity(report, tree):
    goal = {r.label: r.goal for r in report.records}
    assert goal == {"base": "baseline", "pruned": "no", "tuned": "yes", "sparse": "no"}
    assert [f.split(":")[0] for f in report.failures] == ["pruned", "sparse"]
    assert "MACs cut 0.0% < 40%" in report.failures[1]
    assert any("top-1 drop 50.75 pts > 1.5 pts" in f for f in report.failures)
    page = report.html.read_text()
    failures = page[page.index('<section id="failures">'):]
    assert "fragile_layer" in failures and "robust_layer" in failures
    assert failures.index("fragile_layer") < failures.index("robust_layer")  # most sensitive first
    pareto = {r.label: r.row["pareto"] for r in report.records}
    assert pareto["tuned"] and pareto["base"] and not pareto["pruned"] and not pareto["sparse"]


def test_targets_change_goals(tree):
    recs = collect_runs([tree["tuned"]], {"macs": 0.95, "drop": 0.1}, add_baselines=False, sparsity=False)
    assert [r.label for r in recs] == ["tuned"] and recs[0].goal == "no"
    assert len(recs[0].missed) == 2 and recs[0].row["sparsity"] is None


def test_orphan_run_has_no_baseline(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        recs = collect_runs([tree["orphan"]], sparsity=False)
    assert "cannot be found" in caplog.text
    (r,) = recs
    assert r.baseline is None and r.row["top1_drop"] is None and r.row["macs_reduction"] is None
    assert r.goal == "no" and any("unknown" in m for m in r.missed)


def test_channels_and_sparsity_come_from_the_weights(tree):
    model = runs.load_model(tree["pruned"])
    expected = {n: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
                for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert layer_channels(tree["pruned"]) == expected
    assert any(layer_channels(tree["pruned"])[n] < c for n, c in layer_channels(tree["base"]).items())
    scan = scan_weights(tree["sparse"])
    sd = runs.load_model(tree["sparse"]).state_dict()
    for layer, frac in scan.sparsity.items():
        w = sd[layer + ".weight"]
        assert frac == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(scan.sparsity[n] == pytest.approx(0.5, abs=0.01) for n in convs)
    total = sum(sd[n + ".weight"].numel() for n in scan.sparsity)
    zeros = sum(int((sd[n + ".weight"] == 0).sum()) for n in scan.sparsity)
    assert scan.overall_sparsity == pytest.approx(zeros / total, abs=1e-12)


# ------------------------------------------------------------------------------------------------ pieces
def test_pareto_front_on_hand_made_points():
    pts = [(10.0, 90.0), (5.0, 85.0), (6.0, 80.0), (12.0, 89.0), (5.0, 85.0), (3.0, 70.0), (10.0, 88.0)]
    assert pareto_front(pts) == [5, 1, 4, 0]  # cheapest first; duplicates of a front point are kept
    assert pareto_front([(1, 5.0), (2, 1.0), (3, 0.5)], maximize=False) == [0, 1, 2]  # lower value better
    assert pareto_front([(1, 5.0), (2, 1.0), (3, 0.5)]) == [0]
    assert pareto_front([]) == []
    with pytest.raises(ConfigError, match="NaN"):
        pareto_front([(1.0, math.nan)])
    with pytest.raises(ConfigError, match="not a"):
        pareto_front([("a", 1.0)])


def test_targets_parse_and_describe():
    assert parse_targets(None) == {"macs": 0.4, "drop": 1.5}
    assert parse_targets("macs=0.5, drop=1,latency=0.2") == {"macs": 0.5, "drop": 1.0, "latency": 0.2}
    assert describe_targets({"macs": 0.5, "drop": 1.0}) == "MACs cut >= 50%, top-1 drop <= 1 pts"
    for bad, msg in (("mac=0.4", "unknown target 'mac'"), ("macs=1.2", r"\[0, 1\)"), ("drop=x", "not a number"),
                     ("drop", "NAME=VALUE"), ("drop=-1", ">= 0")):
        with pytest.raises(ConfigError, match=msg):
            parse_targets(bad)
    assert missed_targets({"top1": 70.0}, {"top1": 75}) == ["top-1 70.00% < 75%"]


def test_bad_inputs(tree, tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        collect_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="metrics.json"):
        collect_runs([tmp_path / "empty"])
    broken = tmp_path / "broken"
    shutil.copytree(tree["tuned"], broken)
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        collect_runs([broken])
    (broken / "metrics.json").write_text('{"stage": "prune"}')
    with pytest.raises(RunDirError, match="no numeric 'top1'"):
        collect_runs([broken])
    with pytest.raises(ConfigError, match="listed twice"):
        collect_runs([tree["tuned"], tree["tuned"]])
    with pytest.raises(ConfigError, match="at least one"):
        collect_runs([])
    with pytest.raises(ConfigError, match="one of the run directories"):
        make_report([tree["tuned"]], tree["tuned"])
    with pytest.raises(RunDirError, match="does not exist"):
        make_report([tree["tuned"]], tmp_path / "r", sensitivity=tmp_path / "none.json")


def test_cli(tree, tmp_path, capsys):
    from prunekit.cli.main import main

    out = tmp_path / "rep"
    assert main(["report", str(tree["pruned"]), str(tree["tuned"]), "--out", str(out), "--targets",
                 "macs=0.3,drop=1"]) == 0
    text = capsys.readouterr().out
    assert "goal met" in text and "90.50" in text and "MACs cut >= 30%, top-1 drop <= 1 pts" in text
    assert "misses the targets" in text and (out / "report.html").is_file() and (out / "report.md").is_file()
    assert main(["report", str(tree["tuned"]), "--targets", "macs=2"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ in a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# injected into a copy of the page by this test only (the shipped report has no script)
PROBE = ("<script>window.addEventListener('load', () => { for (const im of document.images) "
         "im.setAttribute('data-natural-width', im.naturalWidth); "
         "document.body.setAttribute('data-probed', document.images.length); });</script>")


def _chromium(args: list[str], tmp: Path, name: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{name}"  # a fresh user-data-dir per run
    try:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=90, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"headless chromium could not be run: {e}")


def test_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium browser installed (looked for chromium, chromium-browser, google-chrome)")
    probe = tmp_path / "probe.html"
    probe.write_text(report.html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--run-all-compositor-stages-before-draw", "--virtual-time-budget=15000", "--dump-dom",
                     probe.as_uri()], tmp_path, "dom")
    if dom.returncode != 0 or "<html" not in dom.stdout:
        pytest.skip(f"headless chromium did not start (rc {dom.returncode}): {dom.stderr[-300:]}")
    page = parse(dom.stdout)
    assert page.h2 == [title for _, title in SECTIONS]
    assert int(page.body_attrs["data-probed"]) == len(page.imgs) >= 8
    widths = [int(i["data-natural-width"]) for i in page.imgs]
    assert all(w > 0 for w in widths), widths  # every image decoded
    shot = tmp_path / "shot.png"
    res = _chromium(["--window-size=1200,1600", "--hide-scrollbars", f"--screenshot={shot}", report.html.as_uri()],
                    tmp_path, "shot")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-300:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1600)
    dark = sum(img.histogram()[:200])  # pixels clearly darker than the white page
    assert dark > 0.01 * img.size[0] * img.size[1], "the screenshot is blank"


def test_method_names_the_compensation_and_sweeps_plot_by_method(tree):
    from prunekit.report.plots import method_family

    cfg = tree["pruned"] / "config.yaml"
    saved = cfg.read_text() if cfg.is_file() else None
    try:
        # the pruned run's metrics name no compensation (as runs written before they did): its config.yaml does
        cfg.write_text("criterion: l1\ncompensate: mean\n")
        recs = {r.label: r for r in collect_runs([tree["pruned"], tree["tuned"]])}
        assert recs["pruned"].row["method"] == "l1+mean global r=0.50"
        assert recs["tuned"].row["method"] == "l1+mean global r=0.50"  # from the prune stage it descends from
        cfg.write_text("criterion: l1\ncompensate: none\n")
        recs = {r.label: r for r in collect_runs([tree["pruned"]])}
        assert recs["pruned"].row["method"] == "l1 global r=0.50"
    finally:
        if saved is None:
            cfg.unlink()
        else:
            cfg.write_text(saved)
    assert method_family("variance+lstsq global macs=0.35") == "variance+lstsq global"
    assert method_family("l1 local r=0.50") == "l1 local"


def test_detection_report_speaks_of_map_not_top1(tmp_path):
    """Detection runs (``map50`` / ``map50_95``, no ``top1``): the summary, targets, goals and figure speak of
    mAP50-95 / mAP50 everywhere; a report that mixes in a classifier names both."""
    torch.manual_seed(0)
    model = prunekit.create_model("smallcnn", in_channels=1, num_classes=10, width=8)
    base = make_run(tmp_path / "base", model, {"map50": 0.40, "map50_95": 0.25, "stage": "train", "task": "detect",
                                                    "test_samples": 200})  # as prunekit.pipeline.detect writes
    pruned_model = copy.deepcopy(model)
    prune(pruned_model, X, "l1", ratio=0.5)
    pruned = make_run(tmp_path / "pruned", pruned_model, {"map50": 0.30, "map50_95": 0.20, "stage": "prune",
                                                           "task": "detect", "from": str(base)})
    res = make_report([base, pruned], tmp_path / "report", targets={"macs": 0.4, "drop": 1.5})
    md, html = res.markdown.read_text(), res.html.read_text()
    for text in (md, html):
        assert "top-1" not in text.lower() and "top1" not in text.lower() and "top-5" not in text.lower()
    assert "Targets: MACs cut >= 40%, mAP50-95 drop <= 1.5 pts." in md
    assert "`mAP50` / `mAP50-95` are on each dataset's test split" in md
    assert "no other run beats on both mAP50-95 and MACs" in md
    assert "pruned: mAP50-95 drop 5.00 pts > 1.5 pts" in md  # the goal missed, in mAP words (25.0 -> 20.0)
    old = make_run(tmp_path / "old", model, {"map50": 0.4, "map50_95": 0.25, "stage": "train"})  # no test_samples
    assert "The mAP50-95 of old is not marked as a test-split figure" in make_report(
        [old], tmp_path / "old_report").markdown.read_text()
    classifier = make_run(tmp_path / "cls", model, {"top1": 90.0, "stage": "train"})
    mixed = make_report([pruned, classifier], tmp_path / "mixed").markdown.read_text()
    assert "`top1` / `top5` and `mAP50` / `mAP50-95` are on each" in mixed and "top-1 / mAP50-95 drop" in mixed
