"""The run directory: the contract between stages.

Every stage writes one folder holding exactly::

    model.safetensors   weights (safetensors; tied tensors stored once)
    model.json          architecture spec: registry name or importable constructor + kwargs, example-input spec, the
                        shapes/attributes of every module that differs from a freshly built model (pruned layers)
    config.yaml         the resolved configuration of the stage
    metrics.json        top1, top5 (percent), val_loss, macs, params, ... of the model in this folder
    log.txt             what the stage printed

Training stages also write ``history.jsonl`` (one line per epoch), and with ``--tensorboard`` the same scalars as
TensorBoard event files in ``tensorboard/`` (see ``tensorboard_mirror``). A training stage that is still running (or was
killed) has ``last.ckpt`` (resume state, loaded with ``weights_only=True``); it is removed once the stage finishes.
Nothing here is pickled: a pruned model is rebuilt in a fresh process from ``model.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from prunekit._io import atomic_write_json, atomic_write_text
from prunekit.errors import ConfigError, RunDirError

# the model files: prunekit.runs_spec (model.json, layer diff) and prunekit.runs_model (save / load any model)
from prunekit.runs_model import (  # noqa: F401  (re-exported: prunekit.runs is where stages find them)
    HOOK_PROVIDERS,
    LOAD_HOOKS,
    load_model,
    register_load_hook,
    save_model,
    spec_of,
)
from prunekit.runs_spec import (  # noqa: F401
    PROGRAM,
    SPEC,
    SPEC_FORMAT,
    WEIGHTS,
    ModelSpec,
    apply_diff,
    build_reference,
    example_inputs,
    make_spec,
    module_diff,
    not_a_dir,
    read_spec,
)

CONFIG, METRICS, LOG, HISTORY, CKPT = "config.yaml", "metrics.json", "log.txt", "history.jsonl", "last.ckpt"
RUN_FILES = frozenset({WEIGHTS, SPEC, CONFIG, METRICS, LOG})


# ----------------------------------------------------------------------------------------------- other files
def write_config(run_dir: str | Path, config: Any) -> None:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    atomic_write_text(Path(run_dir) / CONFIG, yaml.safe_dump(data, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / CONFIG
    return yaml.safe_load(p.read_text()) or {} if p.is_file() else {}


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / METRICS, metrics)


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        raise RunDirError(f"{str(run_dir)!r} has no {METRICS}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p} is corrupt: {e}") from None


def append_history(run_dir: str | Path, row: dict[str, Any]) -> None:
    """One line of ``history.jsonl``; mirrored to TensorBoard while ``run_dir`` has a mirror open."""
    with open(Path(run_dir) / HISTORY, "a") as f:
        f.write(json.dumps(row) + "\n")
    mirror = _TB_MIRRORS.get(Path(run_dir).resolve())
    if mirror is not None:
        mirror.add(row)


TENSORBOARD = "tensorboard"  # event files of `--tensorboard`, in this sub-folder of the run dir
_TB_MIRRORS: dict[Path, _TensorBoardMirror] = {}


class _TensorBoardMirror:
    """Every numeric field of each history row -> a TensorBoard scalar ``PHASE/FIELD``, at the row's index in the
    stage's history (one x-axis through PAT's steps and restarts)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'prunekit[tensorboard]'") \
                from None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD))
        self.index = len(read_history(run_dir))

    def add(self, row: dict[str, Any]) -> None:
        self.index += 1
        phase = row.get("phase", "train")
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in ("phase", "epoch", "step"):
                self.writer.add_scalar(f"{phase}/{key}", value, self.index)
        self.writer.flush()


def mirrors_to_tensorboard(run_dir: str | Path) -> bool:
    """Whether history lines of ``run_dir`` reach TensorBoard: it, or a folder above it, has a mirror open (the
    step folders of PAT and iterative sparsify fold their lines into the stage's own history)."""
    p = Path(run_dir).resolve()
    return any(m == p or m in p.parents for m in _TB_MIRRORS)


class tensorboard_mirror:  # noqa: N801  (a context manager used like a function)
    """While open, ``append_history(run_dir, ...)`` also writes TensorBoard scalars to ``run_dir/tensorboard``
    (rank 0 only under torchrun). ``enabled=False`` makes it a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        from prunekit.distributed import rank

        self.path = Path(run_dir).resolve()
        self.enabled = enabled and rank() == 0 and not mirrors_to_tensorboard(self.path)

    def __enter__(self) -> tensorboard_mirror:
        if self.enabled:
            self.path.mkdir(parents=True, exist_ok=True)
            _TB_MIRRORS[self.path] = _TensorBoardMirror(self.path)
        return self

    def __exit__(self, *exc: Any) -> None:
        mirror = _TB_MIRRORS.pop(self.path, None) if self.enabled else None
        if mirror is not None:
            mirror.writer.close()


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / HISTORY
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def check_model_dir(run_dir: str | Path) -> Path:
    """A folder holding a rebuildable model (``model.json`` + ``model.safetensors``: a run directory, or what
    ``save_model`` wrote), or a ``RunDirError`` naming what is missing; for stages that need only the model."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunDirError(not_a_dir(run_dir))
    missing = sorted(f for f in (SPEC, WEIGHTS) if not (p / f).is_file())
    if missing:
        raise RunDirError(f"{str(run_dir)!r} holds no model: missing {', '.join(missing)} (a run directory, or a "
                          "folder written by prunekit.save_model)")
    return p


def check_run_dir(run_dir: str | Path) -> Path:
    """A finished run directory (all of RUN_FILES present) or a ``RunDirError`` naming what is missing."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunDirError(not_a_dir(run_dir))
    missing = sorted(f for f in RUN_FILES if not (p / f).is_file())
    if missing:
        raise RunDirError(f"{str(run_dir)!r} is not a finished run directory: missing {', '.join(missing)}")
    return p


class run_log:  # noqa: N801  (a context manager used like a function)
    """Tee everything the ``prunekit`` logger says during a stage into ``run_dir/log.txt`` (appended on resume)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOG

    def __enter__(self) -> run_log:
        import logging

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, mode="a")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger = logging.getLogger("prunekit")
        logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            self._old_level = logger.level
            logger.setLevel(logging.INFO)
        else:
            self._old_level = None
        return self

    def __exit__(self, *exc: Any) -> None:
        import logging

        logger = logging.getLogger("prunekit")
        logger.removeHandler(self.handler)
        self.handler.close()
        if self._old_level is not None:
            logger.setLevel(self._old_level)


def prepare_out_dir(out: str | Path, resume: bool = False, overwrite: bool | None = False,
                    resumable: bool = True) -> Path:
    """Create a stage's output folder; refuse to clobber a finished run unless ``overwrite`` (nothing is lost).

    ``resumable``: the stage has a ``--resume`` (training stages); ``overwrite=None``: it has no ``--overwrite``
    (eval); the refusal points only to the flags the stage has. ``resume`` on a
    finished run (all of ``RUN_FILES``, no ``last.ckpt``) is refused too: there is nothing to continue, and training
    it again would replace it."""
    import shutil

    from prunekit.distributed import barrier, rank

    p = Path(out)
    not_dir = p.exists() and not p.is_dir()
    held = p.is_dir() and any(p.iterdir())
    finished = held and all((p / f).is_file() for f in RUN_FILES) and not (p / CKPT).exists()
    # a run that crashed or was stopped before its metrics (log.txt, perhaps some run files, no checkpoint to resume
    # from) holds nothing to keep: it is replaced rather than blocking its --out
    crashed = (held and not (p / METRICS).exists() and not (p / CKPT).exists()
               and all(c.name in RUN_FILES | {HISTORY, "tensorboard"} for c in p.iterdir()))
    barrier()  # torchrun: every rank looks before rank 0 changes anything
    if not_dir:
        raise RunDirError(f"--out {str(p)!r} exists and is not a directory")
    if crashed and not overwrite:
        import logging

        logging.getLogger("prunekit").warning("--out %s holds an unfinished run (no %s: it crashed or was stopped); "
                                              "replacing it", p, METRICS)
        held = False
        if rank() == 0:
            shutil.rmtree(p)
    if held and resume and finished and not overwrite:
        raise RunDirError(f"--out {str(p)!r} holds a finished run (no {CKPT} to resume from): --resume has nothing "
                          "to continue; pass --overwrite to run it again, or choose another --out")
    if held and not overwrite and not resume:
        hints = [h for h, ok in (("pass --resume to continue it", resumable),
                                 ("pass --overwrite to replace it", overwrite is not None)) if ok]
        raise RunDirError(f"--out {str(p)!r} already holds a run; " + ", ".join([*hints, "or choose another --out"])
                          if hints else f"--out {str(p)!r} already holds a run; choose another --out")
    if rank() == 0:
        if held and overwrite:
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
    barrier()
    return p
