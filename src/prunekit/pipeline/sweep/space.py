"""The search space of a sweep: ``--grid`` parsing, dotted recipe keys, Optuna ranges and objectives."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from prunekit.errors import ConfigError, closest
from prunekit.pipeline.recipe import STAGES, Recipe

# objective -> (results column, Optuna direction)
OBJECTIVES = {"top1": ("top1", "maximize"), "top5": ("top5", "maximize"), "drop": ("top1_drop", "minimize"),
              "macs": ("macs", "minimize"), "params": ("params", "minimize"), "latency": ("latency_ms", "minimize")}
SET_BY_SWEEP = ("out", "resume", "overwrite")
_TOP_KEYS = ("seed", "device")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Range:
    """A search range (``search="optuna"`` only): ``KEY=LO:HI`` uniform, ``KEY=LO:HI:log`` log-uniform; two ints
    give integers."""

    low: float
    high: float
    log: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}" + (":log" if self.log else "")



# ------------------------------------------------------------------------------------------------ grid parsing
def _parse_value(tok: str) -> Any:
    parts = [p.strip() for p in tok.split(":")]
    if len(parts) in (2, 3) and all(_NUMBER.fullmatch(p) for p in parts[:2]) and parts[2:] in ([], ["log"]):
        lo, hi = (int(p) if p.lstrip("+-").isdigit() else float(p) for p in parts[:2])
        if not lo < hi or (len(parts) == 3 and lo <= 0):
            raise ConfigError(f"--grid: range {tok!r} needs LO < HI (and LO > 0 with :log)")
        return Range(lo, hi, len(parts) == 3)
    if _NUMBER.fullmatch(tok):  # YAML 1.1 reads 1e-3 as a string
        return int(tok) if tok.lstrip("+-").isdigit() else float(tok)
    try:
        return yaml.safe_load(tok)
    except yaml.YAMLError:
        return tok


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["prune.ratio=0.3,0.5", "prune.criterion=l1,taylor"]`` -> ``{"prune.ratio": [0.3, 0.5], ...}``.

    A token without ``=`` continues the previous key, so one item may hold several keys (``a=1,2,b=x,y``). Values
    are YAML scalars (``0.5``, ``1e-3``, ``true``, ``null``, ``l1``); ``LO:HI`` and ``LO:HI:log`` are ``Range``s.
    """
    grid: dict[str, list[Any]] = {}
    key: str | None = None
    for tok in (t.strip() for item in items for t in str(item).split(",")):
        if not tok:
            continue
        if "=" in tok:
            key, tok = (s.strip() for s in tok.split("=", 1))
            if not key:
                raise ConfigError(f"--grid: {'=' + tok!r} has no key; expected KEY=V1,V2,...")
            if key in grid:
                raise ConfigError(f"--grid: key {key!r} is given twice; give all its values once: {key}=V1,V2,...")
            grid[key] = []
            if not tok:
                continue
        elif key is None:
            raise ConfigError(f"--grid: {tok!r} is not KEY=V1,V2,... (e.g. stages.prune.ratio=0.3,0.5)")
        grid[key].append(_parse_value(tok))
    return grid


def resolve_key(key: str, recipe: Recipe) -> str:
    """The full dotted recipe key of a grid key: ``prune.ratio`` -> ``stages.prune.ratio``; unknown keys raise."""
    parts = key.split(".")
    forms = "keys are stages.STAGE.OPTION (or STAGE.OPTION), data.KEY, seed or device"
    if not all(parts):
        raise ConfigError(f"--grid {key!r}: not a dotted key; {forms}")
    if parts[0] in _TOP_KEYS and len(parts) == 1:
        return key
    if parts[0] == "data":
        from prunekit.data import DataArgs

        valid = DataArgs.keys()
        if len(parts) != 2 or parts[1] not in valid:
            near = closest(parts[-1], valid)
            hint = f"; did you mean 'data.{near[0]}'?" if near else ""
            raise ConfigError(f"--grid {key!r}: unknown data key{hint} Valid: {', '.join('data.' + k for k in valid)}")
        return key
    if parts[0] != "stages":
        if parts[0] not in recipe.stages and parts[0] not in STAGES:
            near = closest(parts[0], [*recipe.stages, "data", *_TOP_KEYS])
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--grid {key!r}: {parts[0]!r} is not a stage of the recipe{hint} ({forms}; "
                              f"the recipe's stages: {', '.join(recipe.stages)})")
        parts = ["stages", *parts]
    if len(parts) < 3:
        raise ConfigError(f"--grid {key!r}: name a stage and one of its options, e.g. stages.prune.ratio")
    stage, option = parts[1], parts[2]
    if stage not in recipe.stages:
        near = closest(stage, recipe.stages)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--grid {key!r}: the recipe has no stage {stage!r}{hint} "
                          f"(its stages: {', '.join(recipe.stages)})")
    valid = STAGES.get(stage).config.keys()
    if option not in valid:
        near = closest(option, valid)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--grid {key!r}: stage {stage!r} has no option {option!r}{hint} "
                          f"Valid options: {', '.join(valid)}")
    if option in SET_BY_SWEEP:
        raise ConfigError(f"--grid {key!r}: {option!r} is set by the sweep for every point and cannot be swept")
    return ".".join(parts)


def check_objectives(objectives: Sequence[str]) -> list[str]:
    """Validate Optuna objectives: one or more of ``OBJECTIVES``, each at most once."""
    objectives = list(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives or len(set(objectives)) != len(objectives):
        raise ConfigError(f"--objectives {','.join(objectives)!r}: give one or more distinct names of "
                          f"{', '.join(OBJECTIVES)}")
    return objectives


def suggest(trial: Any, key: str, space: list[Any]) -> Any:
    if isinstance(space[0], Range):
        r = space[0]
        if r.integer:
            return trial.suggest_int(key, r.low, r.high, log=r.log)
        return trial.suggest_float(key, r.low, r.high, log=r.log)
    return trial.suggest_categorical(key, space)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs Optuna: pip install 'prunekit[sweep]' (or pip install optuna)") \
            from None
    return optuna

