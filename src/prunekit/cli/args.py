"""Generate each sub-command's flags from its config class, so there is one list of options, not two.

The sub-commands are the entries of the one registry of commands and stages (``prunekit.pipeline.commands``): a
pipeline stage registers there with its config, run function and help; a module in ``prunekit/cli/`` adds how its
result is printed::

    @prints("prune")
    def prune_cmd(cfg: PruneConfig, metrics: dict) -> None: ...

and a command that is not a pipeline stage registers from here, its function doing the printing::

    @command("graph", GraphConfig, help="Draw a model's layers and pruning groups", positional=())
    def graph_cmd(cfg: GraphConfig) -> None: ...

Field ``calib_batches`` becomes ``--calib-batches``; its pydantic ``description`` is the help text. Values given on
the command line override ``--config FILE.yaml``, which overrides the defaults; everything is validated once by
``Config.build``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prunekit.config import Config, flag_name, read_yaml
from prunekit.errors import ConfigError
from prunekit.pipeline.commands import COMMANDS, Command, add

__all__ = ["COMMANDS", "Command", "add_config_arguments", "command", "prints", "resolve_config"]


def command(name: str, config: type[Config], help: str, positional: tuple[str, ...] = ()):
    """Register a CLI command that is not a pipeline stage (not in recipes); ``fn(cfg)`` prints and returns the exit
    code (``None``: 0)."""
    def deco(fn: Callable[[Config], Any]) -> Callable[[Config], Any]:
        add(Command(name, config, fn, help, stage=None, positional=positional, takes_from=False, writes_run=False))
        return fn

    return deco


def prints(name: str):
    """How the CLI prints the result of the registered command ``name``: ``fn(cfg, result)`` (returns the exit code;
    ``None``: 0)."""
    def deco(fn: Callable[[Config, Any], int | None]) -> Callable[[Config, Any], int | None]:
        COMMANDS.get(name).show = fn
        return fn

    return deco


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _split_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _split_dict(s: str) -> dict[str, str]:
    out = {}
    for item in _split_list(s):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
        k, v = item.rsplit("=", 1)
        out[k.strip()] = v.strip()
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Config], positional: tuple[str, ...] = ()) -> None:
    """One flag per flat key of ``cls`` (sections flattened: ``--reconstruct-steps`` is ``reconstruction.steps``)."""
    defaults = cls.flat_defaults()
    for name, (_, field) in cls.flat_fields().items():
        tp = _unwrap(field.annotation)
        origin = typing.get_origin(tp)
        help_ = field.description or ""
        default = defaults[name]
        if default is not ... and default not in (None, "", [], {}):
            help_ += f" (default: {default if not isinstance(default, Path) else str(default)})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_)
        if name in positional:
            if origin is list:
                parser.add_argument(name, nargs="*" if not field.is_required() else "+", **kw)
            else:
                parser.add_argument(name, nargs="?" if not field.is_required() else None, **kw)
            continue
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw["choices"] = [str(a) for a in typing.get_args(tp)]
            kw["metavar"] = "{" + ",".join(kw["choices"]) + "}"
        elif origin is list:
            kw["type"] = _split_list
            kw["action"] = "extend"  # --grid a=1,2 --grid b=3 accumulates
            kw["metavar"] = "A,B,..."
        elif origin is dict:
            kw["type"] = _split_dict
            kw["metavar"] = "KEY=V,..."
        else:
            kw["metavar"] = getattr(tp, "__name__", "VALUE").upper()
        parser.add_argument(flag_name(name), dest=name, **kw)
    for old, new in cls.renamed.items():  # the old spelling of a renamed flag still works (with a warning)
        parser.add_argument(flag_name(old), dest=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def resolve_config(cls: type[Config], ns: argparse.Namespace) -> Config:
    """Merge defaults < ``--config`` YAML < command-line flags and validate once."""
    values: dict[str, Any] = {}
    cfg_file = getattr(ns, "config", None)
    if cfg_file:
        file_values = read_yaml(cfg_file)
        cls.build(file_values, source=str(cfg_file))  # names the bad key with the file
        values.update(file_values)
    given = {k: v for k, v in vars(ns).items() if k in cls.keys()}
    values.update(given)
    try:
        return cls.build(values, source="command line" if given else str(cfg_file or "config"))
    except ConfigError:
        raise
