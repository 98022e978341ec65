"""Recipes: one YAML file that chains stages over run directories, resumable.

A recipe::

    out: runs/digits-vbp           # where the stages' run directories go (``--out`` overrides)
    data: {dataset: digits, batch_size: 64}   # defaults for every stage that reads data
    seed: 0
    device: cpu
    stages:                        # run in this order; each one's --from is the previous one's output
      baseline: {model: resnet20, epochs: 15, lr: 0.1}   # a train stage, or {from: DIR} to start from a run
      prune: {criterion: variance, target_macs: 0.5}
      finetune: {epochs: 5, kd: true}

Stages: ``baseline``, ``sparse`` (sparse pre-training), ``prune`` (one-shot) or ``pat`` (pruning-aware training),
``finetune``, ``sparsify`` (unstructured / N:M masks, e.g. 2:4 after structured pruning) and ``eval``.
The stages are the entries of ``prunekit.pipeline.commands`` that name a recipe stage (``baseline`` is the command
``train``, ``sparse`` is ``sparse-train``). Each stage writes ``OUT/<n>-<stage>/``; the resolved recipe is saved as
``OUT/recipe.yaml``. ``--resume`` skips finished stages and resumes a training stage from its last checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from prunekit import runs
from prunekit._io import atomic_write_text
from prunekit.config import Config, read_yaml
from prunekit.errors import ConfigError, unknown_name_message
from prunekit.pipeline.commands import STAGES, Command, add
from prunekit.train.distributed import barrier
from prunekit.train.loop import is_main_process

log = logging.getLogger(__name__)


Stage = Command  # a recipe stage is an entry of the one registry of commands and stages


def register_stage(name: str, config: type[Config], run: Callable[[Any], dict[str, Any]], **kw: Any) -> None:
    """Register a recipe stage that is also the command ``name`` (``prunekit.pipeline.commands.register``)."""
    add(Command(name, config, run, stage=name, **kw))


DEMO_RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"


class Recipe(Config):
    """A whole pipeline (see the module docstring)."""

    name: str | None = Field(None, description="a name for the recipe")
    description: str | None = Field(None, description="what the recipe reproduces")
    out: Path = Field(Path("runs/recipe"), description="output directory (one run directory per stage inside)")
    seed: int = Field(0, description="random seed given to every stage")
    device: str = Field("cpu", description="device given to every stage")
    data: dict[str, Any] = Field(default_factory=dict, description="data options shared by every stage")
    stages: dict[str, dict[str, Any]] = Field(description="stage name -> options, run in order")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("a recipe needs at least one stage")
        for name, opts in v.items():
            if name not in STAGES:
                raise ValueError(unknown_name_message("stage", name, STAGES.names()))
            if opts is not None and not isinstance(opts, dict):
                raise ValueError(f"stages.{name} must be a mapping of options, got {type(opts).__name__}")
        return {k: dict(o or {}) for k, o in v.items()}


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    data = read_yaml(path, what="recipe")
    for k, v in (overrides or {}).items():
        check_override(k, data)
        set_dotted(data, k, v)
    recipe = Recipe.build(data, source=str(path))
    stage_configs(recipe)  # validate every stage's options now, before anything runs
    return recipe


def check_override(key: str, recipe: dict[str, Any], flag: str = "--set") -> None:
    """A ``ConfigError`` naming ``flag`` and the key when ``key`` (dotted, as ``set_dotted`` reads it) names no
    option: an unknown top-level key, stage, stage option or data option. The recipe file is not to blame."""
    from prunekit.data import DataArgs

    parts = key.split(".")
    if len(parts) > 1 and parts[0] not in Recipe.model_fields and (
            parts[0] in (recipe.get("stages") or {}) or parts[0] in STAGES.names()):
        parts = ["stages", *parts]
    top = Recipe.keys()
    if parts[0] not in top:
        raise ConfigError(f"{flag} {key}: " + unknown_name_message("recipe key", parts[0], top))
    if parts[0] == "stages" and len(parts) > 1:
        if parts[1] not in STAGES.names():
            raise ConfigError(f"{flag} {key}: " + unknown_name_message("stage", parts[1], STAGES.names()))
        keys = STAGES.get(parts[1]).config.keys()
        if len(parts) > 2 and parts[2] not in keys:
            raise ConfigError(f"{flag} {key}: " + unknown_name_message(f"{parts[1]} option", parts[2], keys))
    if parts[0] == "data" and len(parts) > 1 and parts[1] not in DataArgs.model_fields:
        raise ConfigError(f"{flag} {key}: "
                          + unknown_name_message("data option", parts[1], list(DataArgs.model_fields)))


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(recipe, "stages.prune.ratio", 0.3)``; ``prune.ratio`` (a stage name first) means the same."""
    parts = key.split(".")
    if len(parts) > 1 and parts[0] not in Recipe.model_fields and (
            parts[0] in (d.get("stages") or {}) or parts[0] in STAGES.names()):
        parts = ["stages", *parts]
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{key}: {p!r} is not a mapping in the recipe")
    cur[parts[-1]] = value


def stage_dirs(recipe: Recipe) -> dict[str, Path]:
    return {name: Path(recipe.out) / f"{i}-{name}" for i, name in enumerate(recipe.stages, 1)}


def stage_configs(recipe: Recipe) -> dict[str, Config]:
    """Each stage's validated config, with ``from``/``out``/seed/device/data filled in by the pipeline."""
    from prunekit.data import DataArgs

    unknown = [k for k in recipe.data if k not in DataArgs.model_fields]
    if unknown:  # shared data options go to the stages that take them: a typo would be dropped silently
        raise ConfigError("recipe data: "
                          + unknown_name_message("data option", unknown[0], list(DataArgs.model_fields)))
    dirs = stage_dirs(recipe)
    prev: Path | None = None
    out: dict[str, Config] = {}
    for name, opts in recipe.stages.items():
        st = STAGES.get(name)
        if name == "baseline" and "from" in opts:  # start from an existing run: nothing to build or run
            if set(opts) != {"from"}:
                raise ConfigError(f"recipe stages.baseline: with 'from', no other option is allowed "
                                  f"(got {', '.join(sorted(set(opts) - {'from'}))})")
            prev = Path(opts["from"])
            continue
        keys = st.config.keys()
        values: dict[str, Any] = {}
        for k in ("seed", "device"):
            if k in keys:
                values[k] = getattr(recipe, k)
        for k, v in recipe.data.items():
            if k in keys:
                values[k] = v
        if "out" in keys:
            values["out"] = str(dirs[name])
        if st.takes_from and "from" in keys and prev is not None:
            values["from"] = str(prev)
        values.update(opts)
        if "from" in keys and "from" not in values:
            raise ConfigError(f"stages.{name}: needs a 'from' run directory (it is the first stage)")
        try:
            out[name] = st.config.build(values, source=f"stages.{name}")
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"stages.{name}: ", f"recipe stages.{name}: ")) from None
        if st.writes_run:
            prev = dirs[name]
    return out


def is_finished(run_dir: Path) -> bool:
    return all((run_dir / f).is_file() for f in runs.RUN_FILES) and not (run_dir / runs.CKPT).exists()


def run_recipe(recipe: Recipe, resume: bool = False) -> dict[str, dict[str, Any]]:
    """Run every stage in order; returns each stage's metrics. Finished stages are skipped with ``resume``."""
    out = Path(recipe.out)
    taken = out.is_dir() and any(out.iterdir()) and not resume
    barrier()  # torchrun: every rank looks before rank 0 writes
    if taken:
        raise ConfigError(f"--out {str(out)!r} already holds runs; pass --resume to continue, or choose another --out")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    cfgs = stage_configs(recipe)
    dirs = stage_dirs(recipe)
    results: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(recipe.stages, 1):
        st = STAGES.get(name)
        d = dirs[name]
        if name not in cfgs:  # baseline: {from: DIR}
            results[name] = runs.read_metrics(runs.check_run_dir(recipe.stages[name]["from"]))
            log.info("[%d/%d] %s: using existing run %s", i, len(recipe.stages), name, recipe.stages[name]["from"])
            continue
        cfg = cfgs[name]
        if resume and st.writes_run and is_finished(d):
            log.info("[%d/%d] %s: already finished in %s, skipped", i, len(recipe.stages), name, d)
            results[name] = runs.read_metrics(d)
            continue
        partial = d.is_dir() and any(d.iterdir())
        if partial:
            if st.trains and (d / runs.CKPT).is_file():
                cfg = cfg.model_copy(update={"resume": True})
            else:  # an interrupted non-training stage simply runs again
                cfg = cfg.model_copy(update={"overwrite": True}) if "overwrite" in type(cfg).model_fields else cfg
        log.info("[%d/%d] %s -> %s", i, len(recipe.stages), name, d)
        barrier()  # every rank decided about this stage before rank 0 starts writing into it
        results[name] = st.run(cfg)
        barrier()  # the next stage reads what rank 0 just wrote
    return results


def recipe_report(recipe: Recipe, out: str | Path | None = None) -> Path | None:
    """Write the report (``report.html``, ``report.md``, plots) of a recipe's finished runs into ``OUT/report``;
    returns the HTML path, or None (with a warning) when no run is finished or the report cannot be built."""
    from prunekit.report import make_report

    if not is_main_process():
        return None
    dirs = [d for name, d in stage_dirs(recipe).items() if STAGES.get(name).writes_run and is_finished(d)]
    if not dirs:
        log.warning("no finished run in %s: no report written", recipe.out)
        return None
    try:
        dest = Path(out) if out else Path(recipe.out) / "report"
        return make_report(dirs, dest, title=f"prunekit: {recipe.name or Path(recipe.out).name}").html
    except Exception as e:  # noqa: BLE001 - the runs are done and kept; a report failure must not hide them
        log.warning("the runs are done, but their report failed (%s: %s); retry with `prunekit report %s`",
                    type(e).__name__, e, " ".join(str(d) for d in dirs))
        return None
