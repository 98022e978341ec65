"""The run directory: the contract between stages.

Every stage writes one folder holding exactly::

    model.safetensors   weights (safetensors; tied tensors stored once)
    model.json          architecture spec: registry name, constructor kwargs, example-input spec, and the
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

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from prunekit._io import atomic_write, atomic_write_json, atomic_write_text
from prunekit.errors import ConfigError, RunDirError

SPEC_FORMAT = 1
WEIGHTS, SPEC, CONFIG, METRICS, LOG, HISTORY, CKPT = (
    "model.safetensors",
    "model.json",
    "config.yaml",
    "metrics.json",
    "log.txt",
    "history.jsonl",
    "last.ckpt",
)
RUN_FILES = frozenset({WEIGHTS, SPEC, CONFIG, METRICS, LOG})
# spec.extra[key] -> fn(model, value), run by load_model after the weights are in (e.g. re-attach sparsity masks)
LOAD_HOOKS: dict[str, Any] = {}
# spec.extra[key] -> the module that registers its hook, imported on demand so that a bare ``load_model`` in a fresh
# process re-attaches what the run dir recorded (e.g. sparsity masks) without the caller importing anything else
HOOK_PROVIDERS: dict[str, str] = {"sparsity": "prunekit.pruning.unstructured.masks"}


def register_load_hook(key: str):
    """Register ``fn(model, spec.extra[key])`` to run in ``load_model`` after the weights are loaded."""

    def deco(fn):
        LOAD_HOOKS[key] = fn
        return fn

    return deco


# scalar attribute types worth recording (num_heads, out_channels, normalized_shape, ...)
_SCALARS = (bool, int, float, str)


# ----------------------------------------------------------------------------------------------- model spec
def _attr_ok(v: Any) -> bool:
    if isinstance(v, _SCALARS):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v)


def _module_state(m: nn.Module) -> dict[str, Any]:
    params = {k: (None if p is None else list(p.shape)) for k, p in m._parameters.items()}
    buffers = {k: (None if b is None else list(b.shape)) for k, b in m._buffers.items()}
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(m).items()
             if not k.startswith("_") and k != "training" and _attr_ok(v)}
    return {"params": params, "buffers": buffers, "attrs": attrs}


def module_diff(model: nn.Module, reference: nn.Module | None) -> dict[str, Any]:
    """Per-module parameter/buffer shapes and scalar attributes of ``model`` that differ from ``reference``.

    With no reference every module with parameters is recorded.
    """
    ref = dict(reference.named_modules()) if reference is not None else {}
    out: dict[str, Any] = {}
    for name, m in model.named_modules():
        cur = _module_state(m)
        if name in ref:
            old = _module_state(ref[name])
            d = {kind: {k: v for k, v in cur[kind].items() if old[kind].get(k, "missing") != v}
                 for kind in ("params", "buffers", "attrs")}
        else:
            d = cur
        d = {k: v for k, v in d.items() if v}
        if d:
            out[name] = d
    return out


def apply_diff(model: nn.Module, diff: dict[str, Any]) -> nn.Module:
    """Resize parameters/buffers and set attributes so that ``model`` has the recorded (pruned) architecture.

    The new tensors are uninitialised; load the weights afterwards.
    """
    modules = dict(model.named_modules())
    for name, d in diff.items():
        if name not in modules:
            raise RunDirError(f"model.json names module {name!r}, which the rebuilt model does not have")
        m = modules[name]
        for pname, shape in d.get("params", {}).items():
            old = m._parameters.get(pname)
            dtype = old.dtype if old is not None else _first_dtype(m)
            m._parameters[pname] = None if shape is None else nn.Parameter(
                torch.empty(shape, dtype=dtype), requires_grad=old.requires_grad if old is not None else True)
        for bname, shape in d.get("buffers", {}).items():
            old = m._buffers.get(bname)
            dtype = old.dtype if old is not None else _first_dtype(m)
            m._buffers[bname] = None if shape is None else torch.zeros(shape, dtype=dtype)
        for k, v in d.get("attrs", {}).items():
            cur = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)
    return model


def _first_dtype(m: nn.Module) -> torch.dtype:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        return t.dtype
    return torch.get_default_dtype()


@dataclass
class ModelSpec:
    """What rebuilds a model with no pickle: ``create_model(name, **kwargs)`` then ``apply_diff(modified)``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    modified: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, "name": self.name, "kwargs": self.kwargs, "input": self.input,
                "modified": self.modified, **({"extra": self.extra} if self.extra else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if d.get("format") != SPEC_FORMAT or "name" not in d:
            raise RunDirError(f"model.json has an unknown format (format={d.get('format')!r}, expected {SPEC_FORMAT})")
        return cls(name=d["name"], kwargs=d.get("kwargs", {}), input=d.get("input", {}),
                   modified=d.get("modified", {}), extra=d.get("extra", {}))


def build_reference(spec: ModelSpec) -> nn.Module | None:
    """The freshly built (unpruned, random) model for ``spec``, on the meta device when possible (cheap)."""
    from prunekit.models import create_model

    kwargs = {**spec.kwargs, "pretrained": False}
    try:
        with torch.device("meta"):
            return create_model(spec.name, **kwargs)
    except Exception:  # some constructors do real tensor work; fall back to a CPU build
        try:
            return create_model(spec.name, **kwargs)
        except Exception:
            return None


def make_spec(model: nn.Module, name: str, kwargs: dict[str, Any], input_spec: dict[str, Any],
              extra: dict[str, Any] | None = None) -> ModelSpec:
    spec = ModelSpec(name=name, kwargs=dict(kwargs), input=dict(input_spec), extra=dict(extra or {}))
    spec.modified = module_diff(model, build_reference(spec))
    return spec


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec attached to a model built by ``create_model`` / ``load_model`` (``model.prunekit_spec``)."""
    spec = getattr(model, "prunekit_spec", None)
    if spec is None:
        raise RunDirError("this model was not built by prunekit.create_model or load_model, so it has no spec; "
                          "use save_model(..., spec=ModelSpec(name=..., kwargs=...))")
    return spec


# ----------------------------------------------------------------------------------------------- save / load
def save_model(run_dir: str | Path, model: nn.Module, spec: ModelSpec | None = None) -> ModelSpec:
    """Write ``model.safetensors`` and ``model.json`` atomically; returns the spec written."""
    from safetensors.torch import save_model as st_save

    base = spec or spec_of(model)
    spec = make_spec(model, base.name, base.kwargs, base.input, base.extra)
    run_dir = Path(run_dir)
    was_training = model.training
    atomic_write(run_dir / WEIGHTS, lambda tmp: st_save(model, tmp, metadata={"prunekit_spec": SPEC}))
    atomic_write_json(run_dir / SPEC, spec.to_dict())
    model.train(was_training)
    model.prunekit_spec = spec
    return spec


def read_spec(run_dir: str | Path) -> ModelSpec:
    p = Path(run_dir) / SPEC
    if not Path(run_dir).is_dir():
        raise RunDirError(_not_a_dir(run_dir))
    if not p.is_file():
        raise RunDirError(f"{str(run_dir)!r} is not a run directory: it has no {SPEC}")
    try:
        return ModelSpec.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p} is corrupt: {e}") from None


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a run directory in this process: no pickle, only JSON + safetensors.

    Example:
        >>> model = prunekit.load_model("runs/pruned")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model as st_load

    from prunekit.models import create_model

    spec = read_spec(run_dir)
    w = Path(run_dir) / WEIGHTS
    if not w.is_file():
        raise RunDirError(f"{str(run_dir)!r} has no {WEIGHTS}")
    model = create_model(spec.name, **{**spec.kwargs, "pretrained": False})
    apply_diff(model, spec.modified)
    try:
        missing, unexpected = st_load(model, w, strict=False, device=str(device))
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise RunDirError(f"{w} is corrupt or does not match model.json: {e}") from None
    if missing or unexpected:
        raise RunDirError(f"{w} does not match model.json: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    for key, value in spec.extra.items():
        if key not in LOAD_HOOKS and key in HOOK_PROVIDERS:
            importlib.import_module(HOOK_PROVIDERS[key])
        if key in LOAD_HOOKS:
            LOAD_HOOKS[key](model, value)
    model.to(device)
    model.eval()
    model.prunekit_spec = spec
    return model


def example_inputs(spec: ModelSpec, batch_size: int = 1, device: str | torch.device = "cpu",
                   seed: int = 0) -> Any:
    """Example inputs matching ``spec.input``: an image batch, or a dict of token tensors for text models."""
    inp = spec.input
    g = torch.Generator().manual_seed(seed)
    if inp.get("kind", "image") == "text":
        seq = int(inp.get("seq_len", 32))
        ids = torch.randint(0, int(inp.get("vocab_size", 1000)), (batch_size, seq), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    shape = list(inp.get("shape", [1, 3, 224, 224]))
    return torch.randn([batch_size, *shape[1:]], generator=g).to(device)


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
        from prunekit.train.distributed import rank

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


def _not_a_dir(run_dir: str | Path) -> str:
    if Path(run_dir).exists():
        return f"{str(run_dir)!r} is a file, not a run directory (give the folder that holds {SPEC} and {WEIGHTS})"
    return f"run directory {str(run_dir)!r} does not exist"


def check_model_dir(run_dir: str | Path) -> Path:
    """A folder holding a rebuildable model (``model.json`` + ``model.safetensors``: a run directory, or what
    ``save_model`` wrote), or a ``RunDirError`` naming what is missing; for stages that need only the model."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunDirError(_not_a_dir(run_dir))
    missing = sorted(f for f in (SPEC, WEIGHTS) if not (p / f).is_file())
    if missing:
        raise RunDirError(f"{str(run_dir)!r} holds no model: missing {', '.join(missing)} (a run directory, or a "
                          "folder written by prunekit.save_model)")
    return p


def check_run_dir(run_dir: str | Path) -> Path:
    """A finished run directory (all of RUN_FILES present) or a ``RunDirError`` naming what is missing."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunDirError(_not_a_dir(run_dir))
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

    from prunekit.train.distributed import barrier, rank

    p = Path(out)
    not_dir = p.exists() and not p.is_dir()
    held = p.is_dir() and any(p.iterdir())
    finished = held and all((p / f).is_file() for f in RUN_FILES) and not (p / CKPT).exists()
    barrier()  # torchrun: every rank looks before rank 0 changes anything
    if not_dir:
        raise RunDirError(f"--out {str(p)!r} exists and is not a directory")
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
