"""``prunekit run RECIPE.yaml``: the whole pipeline from one recipe (the embedded demo recipe when none is given)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from prunekit.cli.args import command
from prunekit.config import Config


class RunConfig(Config):
    recipe: Path | None = Field(None, description="recipe YAML (default: the embedded demo recipe)")
    out: Path | None = Field(None, description="output directory (overrides the recipe's `out`)")
    resume: bool = Field(False, description="continue: skip finished stages, resume the interrupted one")
    set: dict[str, str] = Field(default_factory=dict, description="override recipe keys, e.g. "
                                                                  "stages.prune.ratio=0.3,data.batch_size=32")


@command("run", RunConfig, help="Run a recipe: baseline -> (sparse) -> prune -> finetune -> eval -> ...",
         positional=("recipe",))
def run_cmd(cfg: RunConfig) -> None:
    from prunekit.pipeline.recipe import DEMO_RECIPE, load_recipe, recipe_report, run_recipe

    overrides: dict[str, Any] = {k: yaml.safe_load(v) for k, v in cfg.set.items()}
    if cfg.out is not None:
        overrides["out"] = str(cfg.out)
    recipe = load_recipe(cfg.recipe or DEMO_RECIPE, overrides)
    results = run_recipe(recipe, resume=cfg.resume)
    for name, m in results.items():
        if "top1" in m:
            print(f"{name:10s} top1 {m['top1']:6.2f}%  MACs {m.get('macs', 0) / 1e6:8.2f} M  "
                  f"params {m.get('params', 0) / 1e3:8.1f} K")
    print(f"runs in {recipe.out}")
    html = recipe_report(recipe)
    if html is not None:
        print(f"report: {html}")
