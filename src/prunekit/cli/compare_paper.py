"""``prunekit compare-paper --paper vbp-deit-tiny RUN_DIR...``: our runs laid over a published table.

Writes ``paper_comparison.png`` (retention and fine-tuned accuracy vs prune ratio), ``paper_comparison.md`` (the
table of deltas, the citation and provenance) and ``paper_comparison.json`` into ``--out``.

Example::

    prunekit compare-paper --paper vbp-deit-tiny runs/deit/2-prune runs/deit/3-finetune --out runs/deit/paper
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from prunekit.cli.args import command
from prunekit.config import Config


class ComparePaperConfig(Config):
    """``prunekit compare-paper``: compare run directories with a paper's table."""

    runs: list[Path] = Field(description="run directories: prune runs and their fine-tuned descendants")
    paper: str = Field("vbp-deit-tiny", description="the published table to compare with (vbp-deit-tiny)")
    table: Path | None = Field(None, description="JSON file with the paper's per-ratio values (base, rows) laid over "
                                                 "the shipped table")
    out: Path = Field(Path("paper_comparison"), description="folder for paper_comparison.{png,md,json}")

    @field_validator("paper")
    @classmethod
    def _known(cls, v: str) -> str:
        from prunekit.report.paper import PAPERS

        PAPERS.get(v)
        return v

    @field_validator("runs")
    @classmethod
    def _some_runs(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("give at least one run directory")
        return v


@command("compare-paper", ComparePaperConfig, help="Lay run directories over a published table (retention, "
         "fine-tuned accuracy, MACs, params vs prune ratio)", positional=("runs",))
def compare_paper_cmd(cfg: ComparePaperConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from prunekit.report.paper import compare_with_paper, delta_table, write_comparison

    cmp = compare_with_paper(cfg.paper, cfg.runs, cfg.table)
    files = write_comparison(cmp, cfg.out)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    t = cmp.paper
    console.print(f"{t.title}\n{t.citation}", highlight=False)
    console.print(f"paper baseline: top-1 {t.base['top1']:g}%, {t.base['macs'] / 1e9:g} GMACs, "
                  f"{t.base['params'] / 1e6:g} M params ({t.model}, {t.dataset})", highlight=False)
    headers, cells = delta_table(cmp)
    table = Table(title="% of each baseline (retention, after fine-tuning) or % cut; delta = ours - paper",
                  title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for c in cmp.caveats:
        console.print(f"[yellow]caveat[/yellow]: {c}", highlight=False)
    for s in cmp.skipped:
        console.print(f"[yellow]skipped[/yellow]: {s}", highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}", highlight=False)
