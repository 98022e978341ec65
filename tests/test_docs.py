"""The documentation a user reads: the site builds strictly, the README's examples run as written, the version is
the same everywhere, every command's --help shows an example that parses, the catalogues say what works offline,
the benchmark pages carry no development-log wording, and the built pages render in a headless browser."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prunekit
from prunekit.cli.main import build_parser, main
from prunekit.pipeline.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def readme_block(name: str) -> str:
    """The fenced code between the README's snippet markers ``--8<-- [start:NAME]`` / ``[end:NAME]``."""
    m = re.search(rf"\[start:{name}\].*?```\w+\n(.*?)```.*?\[end:{name}\]", README, re.S)
    assert m, f"README has no block marked {name}"
    return m.group(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out


def test_site_builds_strictly_with_generated_references_and_example_code(site):
    cli = (site / "reference/cli/index.html").read_text()
    build_parser()
    for name in COMMANDS.names():  # the CLI reference is generated from the registry: every command is on it
        assert f"prunekit {name}" in cli, name
    assert "--target-macs" in cli and "--reconstruct-steps" in cli
    api = (site / "reference/api/index.html").read_text()
    assert "in place with" in api and "calib_data" in api  # prune()'s docstring, rendered by mkdocstrings
    cnn = (site / "tutorials/cnn/index.html").read_text()
    assert "start_candidate" in cnn  # the tutorial shows examples/cnn_end_to_end.py itself
    assert "cnn_cli" in cnn and "report" in cnn
    start = (site / "getting-started/index.html").read_text()
    assert "save_model" in start and "--8&lt;--" not in start  # the README's example, included
    changelog = (site / "changelog/index.html").read_text()
    assert prunekit.__version__ in changelog
    for page in ("benchmarks/recovery", "benchmarks/latency", "concepts/glossary", "tutorials/decoder-lm",
                 "tutorials/detection", "benchmarks/yolo", "benchmarks/llm-grid"):
        assert (site / page / "index.html").is_file(), page
    detection = (site / "tutorials/detection/index.html").read_text()
    assert "finetune_yolo" in detection and "trust_pickle" in detection  # shows examples/detection.py and the flag
    decoder = (site / "tutorials/decoder-lm/index.html").read_text()
    assert "--kv-ratio" in decoder and "--stream" in decoder and "llm-grid" in decoder


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_block("python-example")
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out/resnet20-pruned/model.safetensors").is_file()
    assert (tmp_path / "out/resnet20-pruned/model.json").is_file()


def test_readme_cli_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [ln for ln in readme_block("cli-example").splitlines() if ln.strip()]
    assert 3 <= len(lines) <= 6
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "prunekit"
        assert main(argv[1:]) in (0, None), line
    assert (tmp_path / "runs/ft/export/model.onnx").is_file()
    assert (tmp_path / "runs/report/report.html").is_file()


def test_one_version_everywhere(capsys):
    tomllib = pytest.importorskip("tomllib")
    version = prunekit.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "prunekit.__version__"
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == version, "CHANGELOG.md's newest entry must name prunekit.__version__"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"prunekit {version}"
    try:
        installed = importlib.metadata.version("prunekit")
    except importlib.metadata.PackageNotFoundError:
        return
    assert installed == version, "the installed metadata is stale: pip install -e . again"


def test_every_command_help_ends_with_an_example_that_parses(capsys):
    parser = build_parser()
    for name in COMMANDS.names():
        example = COMMANDS.get(name).example
        assert (example + " ").startswith(f"prunekit {name} "), f"{name}: no example (pipeline/commands.py EXAMPLES)"
        ns, extra = parser.parse_known_args(shlex.split(example)[1:])
        assert ns.command == name and not extra, f"{name}: example does not parse: {extra}"
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        assert "example: prunekit " + name in " ".join(capsys.readouterr().out.split()), name


def test_catalogues_say_what_each_entry_is_and_whether_it_works_offline(capsys):
    main(["models"])
    out = capsys.readouterr().out
    assert "offline" in out.splitlines()[0] and "input" in out.splitlines()[0]
    row = next(ln for ln in out.splitlines() if ln.startswith("resnet20 "))
    assert "ResNet-20" in row and row.rstrip().endswith("yes")
    assert "timm:<name>" in out and "--pretrained downloads" in out
    main(["datasets"])
    out = capsys.readouterr().out
    digits = next(ln for ln in out.splitlines() if ln.startswith("digits "))
    assert "1 x 16 x 16" in digits and "yes" in digits
    assert "never downloaded" in next(ln for ln in out.splitlines() if ln.startswith("imagenet "))


def test_benchmark_pages_read_as_documentation_not_a_development_log():
    pages = sorted((ROOT / "docs/benchmarks").glob("*.md"))
    assert len(pages) >= 8
    banned = re.compile(r"issue \d|\bsession\b|/work/|\.\./shared|MEASURED\.md|/tmp/", re.I)
    for page in pages:
        text = page.read_text()
        hits = [m.group(0) for m in banned.finditer(text)]
        assert not hits, f"{page.name}: {hits}"
        if page.name != "index.md":
            assert re.search(r"Measured \d{4}-\d\d-\d\d", text), f"{page.name} says when it was measured"
    assert "picked on the test split" in (ROOT / "docs/benchmarks/recovery.md").read_text()
    assert not (ROOT / "docs/results.md").exists()


def check_not_blank(png: Path) -> None:
    from PIL import Image, ImageStat

    image = Image.open(png).convert("L")
    assert image.size[0] >= 800
    assert ImageStat.Stat(image).stddev[0] > 10, f"{png.name} looks blank"
    dark = sum(image.histogram()[:100])  # text pixels
    assert dark > 2000, f"{png.name}: almost no text drawn"


def test_front_page_and_a_tutorial_render_in_headless_chromium(site, tmp_path):
    if not CHROMIUM:
        pytest.skip("no chromium browser installed (looked for chromium, chromium-browser, google-chrome)")
    pytest.importorskip("PIL")
    for page in ("index.html", "tutorials/cnn/index.html"):
        shot = tmp_path / (page.replace("/", "_") + ".png")
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1400",
               "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               (site / page).as_uri()]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"headless chromium could not be run: {e}")
        if not shot.is_file():
            pytest.skip(f"headless chromium wrote no screenshot (rc {res.returncode}): {res.stderr[-300:]}")
        check_not_blank(shot)
