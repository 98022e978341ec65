"""``prunekit`` entry point: parse, validate the config, call one function, turn errors into one clean message."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import traceback

from prunekit.cli.args import COMMANDS, add_config_arguments, resolve_config
from prunekit.errors import PrunekitError

log = logging.getLogger("prunekit")


def _discover() -> None:
    import prunekit.cli as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in ("main", "args", "__main__"):
            importlib.import_module(f"prunekit.cli.{m.name}")


class _Parser(argparse.ArgumentParser):
    """A flag mistake is one line naming the command, the flag, the value and the choices (argparse says those),
    plus where the help is; not the whole usage block (its sub-command parsers are of this class too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from prunekit import __version__

    _discover()
    parser = _Parser(
        prog="prunekit",
        description="Prune trained PyTorch networks end to end: measure, prune, recover, prove, export.",
    )
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.names():
        cmd = COMMANDS.get(name)
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file (flags override it)")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        add_config_arguments(p, cmd.config, cmd.positional)
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of the record (it may be replaced, e.g. by pytest)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout if _rank() == 0 else sys.stderr  # torchrun: stdout of other ranks is silenced

    @stream.setter
    def stream(self, value) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """Under torchrun only rank 0 talks; other ranks show warnings and errors."""
        if record.levelno < logging.WARNING and _rank() != 0:
            return False
        return bool(super().filter(record))


def setup_logging(verbose: bool = True) -> None:
    root = logging.getLogger("prunekit")
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        h = _ConsoleHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 2
    cmd = COMMANDS.get(ns.command)
    setup_logging()
    try:
        cfg = resolve_config(cmd.config, ns)
        from prunekit.train.distributed import init_from_env

        init_from_env(str(getattr(cfg, "device", "cpu")))  # torchrun: WORLD_SIZE > 1
        if _rank() != 0:  # only rank 0 prints results; the others' warnings and errors go to stderr
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        rc = cmd.run(cfg)
        return int(rc or 0)
    except PrunekitError as e:
        if ns.debug:
            traceback.print_exc()
        for line in str(e).splitlines() or [""]:  # every line says whose error it is
            print(f"prunekit {ns.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
