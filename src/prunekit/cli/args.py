"""Generate each sub-command's flags from its config class, so there is one list of options, not two.

A sub-command module in ``prunekit/cli/`` declares::

    @command("prune", PruneConfig, help="Prune a run directory's model", positional=())
    def run(cfg: PruneConfig) -> None: ...

Field ``calib_batches`` becomes ``--calib-batches``; its pydantic ``description`` is the help text. Values given on
the command line override ``--config FILE.yaml``, which overrides the defaults; everything is validated once by
``Config.build``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prunekit.config import Config, flag_name, read_yaml
from prunekit.errors import ConfigError
from prunekit.registry import Registry


@dataclass
class Command:
    name: str
    config: type[Config]
    run: Callable[[Config], Any]
    help: str
    positional: tuple[str, ...] = ()


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, config: type[Config], help: str, positional: tuple[str, ...] = ()):
    def deco(fn: Callable[[Config], Any]) -> Callable[[Config], Any]:
        COMMANDS.register(name)(Command(name, config, fn, help, positional))
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
    for name, (_, field) in cls.flat_fields().items():
        tp = _unwrap(field.annotation)
        origin = typing.get_origin(tp)
        help_ = field.description or ""
        if not field.is_required() and field.default_factory is None and field.default not in (None, "", [], {}):
            help_ += f" (default: {field.default if not isinstance(field.default, Path) else str(field.default)})"
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
