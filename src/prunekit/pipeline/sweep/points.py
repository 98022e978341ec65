"""The points of a sweep: the recipe and the space resolved into one recipe per point (its folder, its
``point.json``), with the baseline runs that points of equal baseline options share."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit import runs
from prunekit.config import read_yaml
from prunekit.errors import ConfigError
from prunekit.pipeline.recipe import (
    DEMO_RECIPE,
    STAGES,
    Recipe,
    check_override,
    is_finished,
    set_dotted,
    stage_configs,
    stage_dirs,
)
from prunekit.pipeline.sweep.space import SET_BY_SWEEP, Range, resolve_key
from prunekit.report.sweep import read_json, scan_points


@dataclass
class Baseline:
    dir: Path
    recipe: Recipe
    status: str = "pending"  # pending | running | ok | failed
    error: str | None = None

    @property
    def run_dir(self) -> Path:
        return stage_dirs(self.recipe)["baseline"]


@dataclass
class Point:
    index: int
    name: str
    settings: dict[str, Any]
    recipe: Recipe
    baseline: Baseline | None
    info: dict[str, Any]  # point.json
    trials: list[int] = field(default_factory=list)  # Optuna trials waiting for this point
    active: bool = False  # queued or running (Optuna: a repeated suggestion waits for it)

    @property
    def dir(self) -> Path:
        return Path(self.recipe.out)

    def done(self) -> bool:
        return self.info.get("status") == "ok" and (self.dir / self.info["final_dir"] / runs.METRICS).is_file()


def _key(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others (``ratio``, ``finetune.lr``)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            s = ".".join(parts[-n:])
            if sum(o.split(".")[-n:] == parts[-n:] for o in keys) == 1:
                break
        out[k] = s
    return out


def _fmt(v: Any) -> str:
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", s)


class Sweep:
    def __init__(self, recipe: str | Path | None, space: Mapping[str, Sequence[Any]], out: Path, search: str,
                 overrides: Mapping[str, Any] | None):
        self.path = Path(recipe) if recipe is not None else DEMO_RECIPE
        self.data = read_yaml(self.path, what="recipe")
        for k, v in (overrides or {}).items():
            check_override(k, self.data)
            set_dotted(self.data, k, v)
        self.out = Path(out).resolve()
        self.base = self._build({}, "recipe")
        self.space: dict[str, list[Any]] = {}
        for key, values in space.items():
            full = resolve_key(key, self.base)
            if full in self.space:
                raise ConfigError(f"--grid: {key!r} and another key both name {full!r}; give it once")
            values = list(dict.fromkeys(values if isinstance(values, (list, tuple)) else [values]))  # dedupe
            if not values:
                raise ConfigError(f"--grid {key!r}: no values; expected {key}=V1,V2,...")
            self.space[full] = values
        self._check_values(search)
        self.short = _short_names(list(self.space))
        self.baselines: dict[str, Baseline] = {}
        self.points: dict[str, Point] = {}
        self.known = {_key(i["settings"]): (i["index"], d.name) for d, i in scan_points(self.out)}

    def _build(self, settings: Mapping[str, Any], where: str, mutate: Callable[[dict], None] | None = None) -> Recipe:
        data = copy.deepcopy(self.data)
        try:
            for k, v in settings.items():
                set_dotted(data, k, v)
            if mutate:
                mutate(data)
            recipe = Recipe.build(data, source=str(self.path))
            stage_configs(recipe)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where != "recipe" else str(e)) from None
        return recipe

    def _check_values(self, search: str) -> None:
        """Every value alone, then (for a grid) every combination: a bad value fails before anything runs."""
        for key, values in self.space.items():
            for v in values:
                if isinstance(v, Range):
                    if search != "optuna":
                        raise ConfigError(f"--grid {key}={v}: a range needs --search optuna; for a grid give values "
                                          f"{key}=V1,V2,...")
                    if len(values) > 1:
                        raise ConfigError(f"--grid {key}: give either one range LO:HI or a list of values, not both")
                    for end in (v.low, v.high):
                        self._build({key: end}, f"--grid {key}={v}")
                    continue
                if search == "optuna" and not (v is None or isinstance(v, (bool, int, float, str))):
                    raise ConfigError(f"--grid {key}={v!r}: Optuna takes only scalar choices (number, string, bool)")
                self._build({key: v}, f"--grid {key}={v!r}")
        if search == "grid":
            for settings in self.grid_points():
                self._build(settings, f"--grid point {', '.join(f'{k}={v!r}' for k, v in settings.items())}")

    def grid_points(self) -> Iterator[dict[str, Any]]:
        for combo in itertools.product(*self.space.values()):
            yield dict(zip(self.space, combo))

    # -- baselines shared between points
    def _shared_baseline(self, settings: dict[str, Any], full: Recipe) -> Baseline | None:
        names = list(full.stages)
        if names[0] != "baseline" or len(names) < 2 or "from" in full.stages["baseline"]:
            return None
        nxt = names[1]
        if "from" not in STAGES.get(nxt).config.keys() or "from" in full.stages[nxt]:
            return None
        cfg = stage_configs(full)["baseline"].to_dict()
        ident = {k: v for k, v in cfg.items() if k not in SET_BY_SWEEP}
        key = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
        if key not in self.baselines:
            d = self.out / "baselines" / key

            def only_baseline(data: dict) -> None:
                data["stages"] = {"baseline": data["stages"]["baseline"]}
                data["out"] = str(d)

            b = Baseline(d, self._build(settings, f"baseline {key}", mutate=only_baseline))
            b.status = "ok" if is_finished(b.run_dir) else "pending"
            self.baselines[key] = b
        return self.baselines[key]

    def point(self, settings: dict[str, Any]) -> Point:
        """The point of ``settings`` (one object per distinct settings, reusing its folder from an earlier run)."""
        key = _key(settings)
        if key in self.points:
            return self.points[key]
        where = f"point {', '.join(f'{k}={v!r}' for k, v in settings.items())}"
        full = self._build(settings, where)
        if key in self.known:
            index, name = self.known[key]
        else:
            index = max([i for i, _ in self.known.values()], default=0) + 1
            label = ",".join(f"{self.short.get(k, k)}={_fmt(v)}" for k, v in settings.items())
            name = f"{index:03d}-{label}"[:100]
            self.known[key] = (index, name)
        d = self.out / "points" / name
        base = self._shared_baseline(settings, full)

        def reroute(data: dict) -> None:
            data["out"] = str(d)
            if base is None:
                return
            stages = data["stages"]
            names = list(stages)
            del stages["baseline"]
            for n in names[1:]:  # the stages up to the first that writes a run read the shared baseline
                stages[n] = {**(stages[n] or {}), "from": str(base.run_dir)}
                if STAGES.get(n).writes_run:
                    break

        recipe = self._build(settings, where, mutate=reroute)
        cfgs = stage_configs(recipe)
        dirs = stage_dirs(recipe)
        final = [n for n, c in cfgs.items() if "out" in type(c).keys()][-1]
        if base is not None:
            baseline_dir: Path | None = base.run_dir
        elif "baseline" in recipe.stages and "from" not in recipe.stages["baseline"]:
            baseline_dir = dirs["baseline"]
        else:
            baseline_dir = getattr(next(iter(cfgs.values())), "from_dir", None)
        info = read_json(d / "point.json") or {"status": "pending", "runs": 0}
        info.update(point=name, index=index, settings=settings, final_dir=str(dirs[final].relative_to(d)),
                    baseline_dir=str(baseline_dir) if baseline_dir else None)
        p = Point(index, name, settings, recipe, base, info)
        self.points[key] = p
        return p

