"""``prunekit sweep RECIPE.yaml --grid KEY=V1,V2,... --out DIR``: a recipe over a grid or an Optuna search.

Examples::

    prunekit sweep recipe.yaml --grid prune.criterion=l1,taylor,prune.ratio=0.3,0.5 --jobs 2 --out runs/sweep
    prunekit sweep recipe.yaml --grid prune.ratio=0.2:0.7,finetune.lr=1e-3:1e-1:log --search optuna --trials 20 \\
        --objectives top1,macs --out runs/search

Rerunning the same command resumes: finished points are skipped, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from prunekit.cli.args import command
from prunekit.config import Config


class SweepConfig(Config):
    """``prunekit sweep``: run a recipe over a grid of settings (or an Optuna search), resumable."""

    recipe: Path | None = Field(None, description="recipe YAML (default: the embedded demo recipe)")
    grid: list[str] = Field([], description="KEY=V1,V2,... with KEY a dotted recipe key "
                            "(stages.prune.ratio or prune.ratio, data.batch_size, seed); more keys in the same list: "
                            "a=1,2,b=x,y. With --search optuna also KEY=LO:HI or KEY=LO:HI:log")
    out: Path = Field(Path("runs/sweep"), description="sweep folder (rerun the same sweep to resume it)")
    search: Literal["grid", "optuna"] = Field("grid", description="grid: every combination; optuna: TPE search")
    trials: int | None = Field(None, ge=1, description="Optuna trials in all (rerun with more to extend)")
    objectives: list[str] = Field(["top1"], description="Optuna objectives, one or more of top1, top5, drop, macs, "
                                  "params, latency (two or more: multi-objective)")
    targets: dict[str, float] = Field({"macs": 0.4, "drop": 1.5}, description="what the best point must meet: "
                                      "macs/params/latency = minimum fraction cut, drop = maximum top-1 drop "
                                      "(points), top1 = minimum top-1 ('' for none); with optuna, the search's "
                                      "constraints")
    jobs: int = Field(1, ge=1, description="points run in parallel, one process each")
    retry_failed: bool = Field(True, description="rerun points that failed in an earlier run of this sweep")
    set: dict[str, str] = Field({}, description="fixed recipe overrides applied before sweeping, "
                                "e.g. stages.baseline.epochs=30")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict[str, float]) -> dict[str, float]:
        from prunekit.pipeline.sweep import check_targets

        return check_targets(v)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        from prunekit.pipeline.sweep import check_objectives

        return check_objectives(v)


@command("sweep", SweepConfig, help="Run a recipe over a grid of settings (or an Optuna search): resumable, "
         "parallel, with a Pareto front", positional=("recipe",))
def sweep_cmd(cfg: SweepConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from prunekit.pipeline.sweep import describe_targets, run_sweep

    overrides: dict[str, Any] = {k: yaml.safe_load(v) for k, v in cfg.set.items()}
    res = run_sweep(cfg.recipe, cfg.grid, cfg.out, search=cfg.search, trials=cfg.trials,
                    objectives=cfg.objectives, targets=cfg.targets, jobs=cfg.jobs, overrides=overrides,
                    retry_failed=cfg.retry_failed)
    keys = list(dict.fromkeys(k for r in res.points for k in r["settings"]))
    t = Table(title=f"prunekit sweep: {len(res.points)} points in {res.out}")
    for col in ("point", *(k.removeprefix("stages.") for k in keys), "top-1 (%)", "drop", "MACs (M)", "cut", ""):
        t.add_column(col, justify="left" if col in ("point", "") else "right")

    def num(r: dict[str, Any], k: str, f: str) -> str:
        return format(r[k], f) if k in r else "-"

    for r in res.points:
        mark = "best" if res.best and r["point"] == res.best["point"] else ("front" if r.get("pareto") else "")
        if r["status"] != "ok":
            mark = r["status"].upper()
        t.add_row(r["point"].split("-", 1)[0], *(str(r["settings"].get(k, "")) for k in keys),
                  num(r, "top1", ".2f"), num(r, "top1_drop", "+.2f"), f"{r['macs'] / 1e6:.2f}" if "macs" in r else "-",
                  num(r, "macs_reduction", ".1%"), mark)
    Console().print(t)
    goals = describe_targets(res.targets)
    if res.best:
        print(f"best meeting the targets ({goals}): {res.best['point']}: top-1 {res.best['top1']:.2f}%, "
              f"MACs cut {res.best.get('macs_reduction', float('nan')):.1%}")
    else:
        print(f"no point meets the targets ({goals}); see the Pareto front in {res.out / 'pareto.png'}")
    for r in res.failed:
        print(f"{r['point']}: {r['status']}: {r.get('error', '')} (log: {res.out / r['dir'] / 'output.log'})")
    print(f"results in {res.out / 'results.csv'}")
    return 1 if res.failed else 0
