"""The one prologue and epilogue of every stage over run directories.

Example::

    with stage_run(cfg, "finetune", resumable=True) as run:
        model = run.model                  # the source run's model, on run.device, after torch.manual_seed(cfg.seed)
        ...                                # train; run.data = the resolved data settings, run.before = source metrics
        write_run(run.out, model, {**cfg.to_dict(), **run.data}, metrics, run.spec)
    # on success: the resume checkpoint is removed (finish_run)

The prologue, in order: check ``--device``; check that ``--from`` is a run directory; refuse ``--out`` == ``--from``;
prepare ``--out`` (refuse to clobber a finished run, replace a crashed one, resume an interrupted one); resolve the data
settings (the stage's flags, else the source run's, else the defaults); open the run log (``log.txt``) and the
TensorBoard mirror; seed; load the source model and read its metrics. Stages that read or write something other than a
run directory (a causal LM folder, an export folder) use the steps they need: ``refuse_same_folder``, ``prepare_out``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import runs
from prunekit.config import Config
from prunekit.data import DataArgs
from prunekit.data.core import data_settings
from prunekit.errors import ConfigError
from prunekit.train import finish_run
from prunekit.train.settings import check_device


@dataclass
class StageRun:
    """What the prologue prepared for a stage."""

    name: str
    out: Path | None  # the prepared output run directory (log.txt open while the stage runs); None: writes none
    source: Path | None  # the checked --from run directory; None: reads none
    device: str
    data: dict[str, Any] = field(default_factory=dict)  # data_settings(): dataset, data_dir, image_size, split
    model: nn.Module | None = None  # the source model, loaded on ``device``
    before: dict[str, Any] = field(default_factory=dict)  # the source run's metrics

    @property
    def spec(self) -> runs.ModelSpec:
        return self.model.prunekit_spec  # type: ignore[union-attr]

    def example_inputs(self, batch: int = 1) -> Any:
        """Example inputs of the source model (its spec), on the stage's device."""
        return runs.example_inputs(self.spec, batch, self.device)


def refuse_same_folder(out: str | Path | None, source: str | Path | None, fix: str = "choose another --out",
                       what: str = "the same folder as --from") -> None:
    """``ConfigError`` when ``--out`` is the ``--from`` folder (a stage would overwrite what it reads)."""
    if out is not None and source is not None and Path(out).resolve() == Path(source).resolve():
        raise ConfigError(f"--out {str(out)!r} is {what}; {fix}")


def prepare_out(cfg: Any, resumable: bool = False) -> Path:
    """``runs.prepare_out_dir`` for ``cfg.out`` with the stage's own flags: ``--resume`` when ``resumable``,
    ``--overwrite`` when the config has it (the refusal names only the flags the stage has)."""
    resume = bool(getattr(cfg, "resume", False)) if resumable else False
    return runs.prepare_out_dir(cfg.out, resume=resume, overwrite=getattr(cfg, "overwrite", None),
                                resumable=resumable)


def option(cfg: Any, key: str, default: Any = None) -> Any:
    """A stage option by its flat key, wherever it lives (the stage's own field or one of its sections)."""
    if isinstance(cfg, Config):
        return cfg.flat().get(key, default)
    return getattr(cfg, key, default)


def data_section(cfg: Any) -> Any | None:
    """The config's data options: its ``data`` section, itself when it takes the data flags flat, else ``None``."""
    if isinstance(getattr(cfg, "data", None), DataArgs):
        return cfg.data
    return cfg if isinstance(cfg, DataArgs) else None


@contextlib.contextmanager
def stage_run(cfg: Any, name: str, *, reads_run: bool = True, writes_run: bool = True, resumable: bool = False,
              loads_model: bool = True, logs: bool = True) -> Iterator[StageRun]:
    """The prologue of stage ``name`` (see the module docstring); yields a ``StageRun``.

    Args:
        cfg: the stage's config (``from_dir``, ``out``, ``device``, ``seed``, ``resume``, ``overwrite``, data flags:
            whichever it has).
        reads_run: ``cfg.from_dir`` is a run directory to check and load.
        writes_run: ``cfg.out`` is a run directory to prepare (``None`` there: the stage writes none).
        resumable: the stage has ``--resume`` (a training stage): the checkpoint is removed at the end.
        loads_model: load the source model (and its metrics).
        logs: open ``log.txt`` (and the TensorBoard mirror with ``--tensorboard``) in ``out``.
    """
    device = check_device(option(cfg, "device", "cpu"))
    source = Path(cfg.from_dir) if reads_run else None
    if source is not None:
        runs.check_run_dir(source)
    out = getattr(cfg, "out", None) if writes_run else None
    refuse_same_folder(out, source)
    out = prepare_out(cfg, resumable) if out is not None else None
    section = data_section(cfg)
    data = data_settings(section, runs.read_config(source) if source else None) if section is not None else {}
    with contextlib.ExitStack() as stack:
        if out is not None and logs:
            stack.enter_context(runs.run_log(out))
            stack.enter_context(runs.tensorboard_mirror(out, bool(option(cfg, "tensorboard", False))))
        if option(cfg, "seed") is not None:
            torch.manual_seed(option(cfg, "seed"))
        run = StageRun(name, out, source, device, data)
        if source is not None and loads_model:
            run.model = runs.load_model(source, device)
            run.before = runs.read_metrics(source)
        yield run
    if out is not None and resumable:
        finish_run(out)


def write_eval_run(run: StageRun, cfg: Config, metrics: dict[str, Any]) -> None:
    """``eval --out``: the evaluated model's files copied beside its config and metrics (nothing without --out)."""
    import shutil

    if run.out is None:
        return
    for f in (runs.WEIGHTS, runs.SPEC):
        shutil.copy2(Path(cfg.from_dir) / f, run.out / f)
    runs.write_config(run.out, {**cfg.to_dict(), **run.data})
    runs.write_metrics(run.out, metrics)
