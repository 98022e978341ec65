"""The one registry of commands and stages: each registers once; the CLI builds its sub-commands from it and recipes
look their stages up in it.

Example::

    @register("prune", PruneConfig, help="Prune the model of a run directory (structured: channels, heads)",
              stage="prune")
    def prune_run(cfg: PruneConfig) -> dict[str, Any]: ...

Every entry is a CLI sub-command (``prunekit prune``); it is also a recipe stage when ``stage`` names it
(``stages: {prune: ...}``; a stage may have another name in recipes: ``train`` is ``baseline`` there). Commands that
are not stages (``report``, ``graph``, ``models`` ...) register from ``prunekit.cli`` with ``stage``
left out. ``COMMANDS`` holds every entry by command name; ``STAGES`` is the same entries seen by stage name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prunekit.config import Config
from prunekit.errors import ConfigError, unknown_name_message
from prunekit.registry import Registry

# the modules that register the built-in stages (imported on first use of the registry)
BUILTIN = ("prunekit.pipeline.stages", "prunekit.pipeline.prune", "prunekit.pipeline.pat",
           "prunekit.pipeline.sparse_stage", "prunekit.pipeline.sparsify", "prunekit.pipeline.llm",
           "prunekit.pipeline.export", "prunekit.pipeline.profile", "prunekit.pipeline.sensitivity",
           "prunekit.pipeline.quantize")


@dataclass
class Command:
    """One command and/or recipe stage."""

    name: str  # the CLI sub-command: prunekit NAME
    config: type[Config]
    run: Callable[[Any], Any]  # config -> result (a stage's metrics)
    help: str = ""
    stage: str | None = None  # its name in a recipe; None: not a recipe stage
    positional: tuple[str, ...] = ()  # config fields taken as positional arguments on the command line
    takes_from: bool = True  # recipe: reads the previous stage's output
    writes_run: bool = True  # writes a run directory the next stage can read
    trains: bool = False  # has epochs and a resumable checkpoint
    show: Callable[[Any, Any], int | None] | None = None  # CLI: prints (config, result) for humans; set by cli/
    example: str = ""  # one command line that runs (``--help`` shows it); empty: the one in EXAMPLES

    def __post_init__(self) -> None:
        self.example = self.example or EXAMPLES.get(self.name, "")


# the example line of each built-in command's --help (tests/test_docs.py parses every one of them)
EXAMPLES = {
    "train": "prunekit train --model resnet20 --dataset digits --epochs 10 --out runs/base",
    "eval": "prunekit eval --from runs/base",
    "prune": "prunekit prune --from runs/base --criterion variance --target-macs 0.5 --out runs/pruned",
    "finetune": "prunekit finetune --from runs/pruned --epochs 5 --lr 0.05 --kd --out runs/ft",
    "pat": "prunekit pat --from runs/base --steps 3 --target-macs 0.5 --epochs 5 --out runs/pat",
    "sparse-train": "prunekit sparse-train --from runs/base --method l1_group --lam 0.01 --out runs/sparse",
    "sparsify": "prunekit sparsify --from runs/base --method nm --nm 2:4 --out runs/sparse24",
    "prune-llm": "prunekit prune-llm --from LLAMA_DIR --calib-text train.txt --mlp-ratio 0.5 --out runs/llm",
    "quantize": "prunekit quantize --from runs/ft --backend onnxruntime --out runs/int8",
    "export": "prunekit export --from runs/ft --format onnx,torchscript --verify",
    "profile": "prunekit profile --baseline runs/base --pruned runs/ft",
    "report": "prunekit report runs/base runs/pruned runs/ft --out runs/report",
    "sensitivity": "prunekit sensitivity --from runs/base --criterion l1",
    "graph": "prunekit graph --model resnet20 --out graph.svg",
    "compare-paper": "prunekit compare-paper --paper vbp-deit-tiny runs/deit/2-prune runs/deit/3-finetune",
    "models": "prunekit models --pattern resnet",
    "datasets": "prunekit datasets",
    "demo": "prunekit demo --out runs/demo",
    "run": "prunekit run configs/digits_quick.yaml --out runs/quick",
    "sweep": "prunekit sweep configs/digits_quick.yaml --grid prune.ratio=0.3,0.5 --out runs/sweep",
}


COMMANDS: Registry[Command] = Registry("command")


def register(name: str, config: type[Config], help: str = "", **kw: Any) -> Callable[[Callable], Callable]:
    """Register ``fn`` as command ``name`` (see ``Command`` for the keywords); returns ``fn`` unchanged."""
    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        add(Command(name, config, fn, help, **kw))
        return fn

    return deco


def add(entry: Command) -> Command:
    """Add an entry; a stage name already taken is refused like a command name already taken."""
    if entry.stage is not None and any(c.stage == entry.stage for c in _entries()):
        raise ValueError(f"stage {entry.stage!r} is already registered")
    COMMANDS.register(entry.name)(entry)
    return entry


def load_builtin() -> None:
    """Import the modules that register the built-in stages (idempotent)."""
    for module in BUILTIN:
        importlib.import_module(module)


def _entries() -> list[Command]:
    return [COMMANDS.get(n) for n in COMMANDS.names()]


class _Stages:
    """``COMMANDS`` seen by recipe stage name: ``get``, ``names``, ``in``, iteration (the built-ins loaded first)."""

    def _table(self) -> dict[str, Command]:
        load_builtin()
        return {c.stage: c for c in _entries() if c.stage is not None}

    def get(self, name: str) -> Command:
        table = self._table()
        if name not in table:
            raise ConfigError(unknown_name_message("stage", name, table))
        return table[name]

    def names(self) -> list[str]:
        return sorted(self._table())

    def __contains__(self, name: object) -> bool:
        return name in self._table()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._table())


STAGES = _Stages()
