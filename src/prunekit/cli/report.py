"""``prunekit report RUN_DIR... [--out DIR] [--targets macs=0.4,drop=1.5]``: compare run directories.

Prints the runs side by side and writes ``report.html`` (self-contained), ``report.md`` and the figures as PNGs.

Example::

    prunekit report runs/base runs/pruned runs/finetuned --out runs/report --targets macs=0.5,drop=1
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from prunekit.cli.args import command
from prunekit.config import Config
from prunekit.report.targets import DEFAULT_TARGETS, parse_targets


class ReportConfig(Config):
    """``prunekit report``: tables and plots over run directories."""

    runs: list[Path] = Field(description="run directories to compare (Hugging Face LM folders of prune-llm / "
                                         "sparsify get a table of their own)")
    out: Path = Field(Path("report"), description="folder for report.html, report.md and the PNG figures")
    targets: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TARGETS),
                                      description="goals: macs/params/latency = minimum fraction cut, drop = maximum "
                                                  "top-1 drop (points), top1 = minimum top-1 (default: "
                                                  "macs=0.4,drop=1.5)")
    sensitivity: Path | None = Field(None, description="a sensitivity.json to name the most sensitive layers "
                                                       "(default: one found in a run or its ancestors)")
    baselines: bool = Field(True, description="also list the baseline each run descends from")

    @field_validator("runs")
    @classmethod
    def _some_runs(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("give at least one run directory")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: object) -> dict[str, float]:
        return parse_targets(v if isinstance(v, (dict, str)) else None if v is None else str(v))


@command("report", ReportConfig, help="Compare run directories: a table here, report.html + report.md + PNGs in --out",
         positional=("runs",))
def report_cmd(cfg: ReportConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunekit.pipeline.llm import is_hf_folder
    from prunekit.report.build import make_report
    from prunekit.report.table import text_table
    from prunekit.report.targets import describe_targets

    llm = [d for d in cfg.runs if is_hf_folder(d)]
    if llm:
        _llm_table(llm, cfg.out, only=len(llm) == len(cfg.runs))
        if len(llm) == len(cfg.runs):
            return
    res = make_report([d for d in cfg.runs if d not in llm], cfg.out, cfg.targets, cfg.sensitivity,
                      add_baselines=cfg.baselines)
    rows = [r.row for r in res.records]
    headers, cells = text_table(rows)
    table = Table(title=f"targets: {describe_targets(res.targets)}", title_justify="left")
    for i, h in enumerate(headers):
        if i < 4:  # run, stage, model, method: fold long names rather than cut numbers
            table.add_column(h, justify="left", overflow="fold")
        else:
            table.add_column(h, justify="right", no_wrap=True, min_width=max(len(h), *(len(c[i]) for c in cells)))
    style = {"baseline": "dim", "no": "red", "yes": "green"}
    for r, row in zip(res.records, cells):
        table.add_row(*row, style=style.get(r.goal))
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect
        console = Console(width=max(console.width, 200))
    console.print(table)
    for line in res.failures:
        console.print(f"[red]misses the targets[/red]: {line}", highlight=False)
    console.print(f"wrote {res.html}, {res.markdown} and {len(res.figures)} figures", highlight=False)


def _llm_table(folders: list[Path], out: Path, only: bool) -> None:
    """Causal LM folders (prune-llm / sparsify outputs): their metrics.json side by side, printed and written to
    ``--out`` as report.md (only LM folders given) or llm.md (beside the run directories' report)."""
    from prunekit.pipeline.llm_folders import llm_markdown, llm_rows

    md = llm_markdown(llm_rows(folders))
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("report.md" if only else "llm.md")
    path.write_text("# Causal LM folders\n\n" + md)
    print(md, end="")
    print(f"wrote {path}")
