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
from prunekit.errors import PrunekitError, closest
from prunekit.pipeline.commands import load_builtin

log = logging.getLogger("prunekit")
MAX_ERROR_LINES = 12  # a longer message is cut: the rest is noise on a terminal


def _discover() -> None:
    """The registry's entries: the pipeline's stages, then the CLI modules (printers and CLI-only commands)."""
    import prunekit.cli as pkg

    load_builtin()
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in ("main", "args", "__main__"):
            importlib.import_module(f"prunekit.cli.{m.name}")


class _Parser(argparse.ArgumentParser):
    """A flag mistake is one line naming the command, the flag, the value and the choices (argparse says those),
    plus where the help is; not the whole usage block (its sub-command parsers are of this class too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unknown(self, extra: list[str]) -> None:
        """Refuse the arguments nothing took, with a did-you-mean for each mistyped flag (``--critrion``)."""
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        hints = []
        for arg in extra:
            flag = arg.split("=", 1)[0]
            near = closest(flag, flags, n=1) if flag.startswith("-") else []
            if near:
                hints.append(f"{flag}: did you mean {' or '.join(near)}?")
        self.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; {'; '.join(hints)}" if hints else ""))


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
        p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                           epilog=f"example: {cmd.example}" if cmd.example else None)
        p.set_defaults(_parser=p)  # so main() can say which sub-command a stray flag belongs to
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
    ns, extra = parser.parse_known_args(argv)
    if extra:
        getattr(ns, "_parser", parser).unknown(extra)  # exits 2
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
        result = cmd.run(cfg)
        rc = cmd.show(cfg, result) if cmd.show is not None else result
        return rc if isinstance(rc, int) else 0
    except PrunekitError as e:
        if ns.debug:
            traceback.print_exc()
        _print_error(ns.command, str(e))
        return 2
    except KeyboardInterrupt:
        print(f"prunekit {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - not a known user mistake: one line, the traceback only with --debug
        if ns.debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300].rstrip(".")
        hint = "" if ns.debug else "; run with --debug for the traceback"
        print(f"prunekit {ns.command}: error: unexpected {type(e).__name__}: {first}{hint}", file=sys.stderr)
        return 1


def _print_error(command: str, message: str) -> None:
    """Every line says whose error it is; a message of many lines (a list of keys...) is cut."""
    lines = message.splitlines() or [""]
    if len(lines) > MAX_ERROR_LINES:
        lines = [*lines[:MAX_ERROR_LINES - 1], f"... and {len(lines) - MAX_ERROR_LINES + 1} more lines"]
    for line in lines:
        print(f"prunekit {command}: error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
