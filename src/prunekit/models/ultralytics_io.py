"""A pruned YOLO back in Ultralytics: ``to_yolo(model)`` for ``predict`` / ``val`` / ``export`` / ``train``, and
``finetune_yolo`` with Ultralytics' trainer keeping the pruned architecture.

What Ultralytics 8.4 does with a model, and what is done for a pruned one (Ultralytics' files untouched):

- ``YOLO(...)`` takes a yaml or a ``.pt`` path, never a module; ``PrunedYOLO`` builds no model from a yaml: its
  ``_new`` installs the given module (the attributes ``Model._new`` sets: ``args``, ``task``, the overrides).
- ``predict`` / ``val`` / ``export`` work on the module as it is: Ultralytics 8.4 fuses Conv + BatchNorm in a copy
  (``engine/predictor.py`` ``setup_model``, ``engine/validator.py`` ``get_model``, the exporter), never in the module
  (the tests check it: older releases fused in place). ``predict`` keeps its fused copy between calls: after changing
  the weights outside ``train``, set ``yolo.predictor = None``.
- The trainer rebuilds the model from the yaml (``BaseTrainer.setup_model`` -> ``get_model``, and ``Model.train``
  calls ``get_model(cfg=model.yaml)`` itself), at the yaml's widths. ``PrunedTrainer`` keeps the module it is given.
- The trainer writes ``last.pt`` / ``best.pt`` (pickles of the whole model) and reads them back (``final_eval``:
  ``strip_optimizer`` and the validator; ``Model.train``: ``load_checkpoint``). ``PrunedTrainer`` writes no
  checkpoint: the best EMA weights are kept in memory and come back as the module; save it with
  ``prunekit.save_model`` (safetensors + ``model.json``).

Example:
    >>> yolo = to_yolo(pruned)                       # pruned: a DetectionModel after prunekit.prune
    >>> yolo.predict(image)                          # numpy HWC BGR image, as Ultralytics takes it
    >>> model, metrics = finetune_yolo(pruned, "data.yaml", epochs=10, imgsz=320, project="runs/ft")
    >>> prunekit.save_model("runs/ft/model", model)
"""

from __future__ import annotations

import copy
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import ConfigError
from prunekit.models.ultralytics import import_ultralytics


def _yaml_name(model: nn.Module) -> str:
    """The name Ultralytics gives the model (its yaml's file name): used for run names and export file names."""
    yaml = getattr(model, "yaml", None) or {}
    return Path(str(yaml.get("yaml_file") or "pruned.yaml")).name


def _num_classes(model: nn.Module) -> int | None:
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    return getattr(head, "nc", None)


class PrunedTrainer:
    """Mixin for an Ultralytics trainer (``DetectionTrainer``, ``SegmentationTrainer``, ...): trains the module it is
    given as it is, writes no pickled checkpoint, and returns the best EMA weights in memory (``trained_model``).

    ``teacher`` (e.g. the unpruned model) turns on distillation, weighted by Ultralytics' ``dis`` argument; a copy
    of it is used, the given module is left as it is. ``kd="head"`` (the default): the student's head outputs
    matched to the teacher's (``head_kd_loss``; a pruned head keeps its output channels, so nothing new is learned
    and the loss is 0 where the student equals the teacher), ``dis`` 1.0 unless given. ``kd="features"``:
    Ultralytics' own ``DistillationModel`` loss (the head's input features through a randomly initialised 1x1
    projector to the teacher's widths, ``dis`` 6.0: made for a larger teacher; on a pruned YOLOv8n its projector's
    early loss outweighs the detection loss about four to one and the fine-tune ends below one without teacher).
    """

    def __init__(self, model: nn.Module, cfg: Any = None, overrides: dict[str, Any] | None = None,
                 _callbacks: dict | None = None, *, teacher: nn.Module | None = None, kd: str = "head") -> None:
        from ultralytics.utils import DEFAULT_CFG

        if kd not in KD_MODES:
            raise ConfigError(f"kd={kd!r}: valid: {', '.join(KD_MODES)}")

        overrides = {**(overrides or {}), "model": _yaml_name(model)}  # a name only: the module is set below
        if overrides.get("resume"):
            raise ConfigError(f"resume={overrides['resume']!r}: resuming reads Ultralytics' pickled last.pt, which "
                              "this trainer does not write; fine-tune again from the saved prunekit model")
        if overrides.get("distill_model") is not None:
            raise ConfigError(f"distill_model={overrides['distill_model']!r}: Ultralytics loads it as a pickle; pass "
                              "the teacher module (teacher=..., e.g. the unpruned model)")
        if teacher is not None and _num_classes(teacher) != _num_classes(model):
            raise ConfigError(f"teacher: its head has {_num_classes(teacher)} classes, the model's "
                              f"{_num_classes(model)}")
        if teacher is not None and kd == "head" and overrides.get("dis") is None:
            overrides["dis"] = HEAD_KD_WEIGHT
        super().__init__(cfg or DEFAULT_CFG, overrides, _callbacks)
        self.model = model  # BaseTrainer.setup_model() keeps a module as it is
        self.kd = kd
        if teacher is not None:  # read by _setup_train after args.yaml is written (a module is not yaml)
            self.args.distill_model = copy.deepcopy(teacher)
        self._best_state: dict[str, Any] | None = None
        self._best_epoch = -1

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """The pruned module, never one rebuilt from ``cfg`` (the yaml's widths)."""
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"{type(self).__name__}: no model to train (got {self.model!r})")
        return self.model

    def _setup_train(self, *args: Any, **kwargs: Any) -> None:
        """Ultralytics' setup; with ``kd="head"`` its ``DistillationModel`` computes ``head_kd_loss`` instead (the
        optimizer and EMA built by the setup are unchanged: the unused projector gets no gradient)."""
        super()._setup_train(*args, **kwargs)
        from ultralytics.nn.distill_model import DistillationModel

        if self.kd == "head" and type(self.model) is DistillationModel:
            self.model.__class__ = head_distillation_class()

    def save_model(self) -> bool:
        """Keep the EMA weights of the best epoch so far, in memory (Ultralytics would pickle the whole model)."""
        if self._best_state is None or self.best_fitness == self.fitness:
            self._best_state = {k: v.detach().clone() for k, v in self.ema.ema.state_dict().items()}
            self._best_epoch = self.epoch
        return False  # nothing written: the on_model_save callbacks (which read last.pt) do not run

    def final_eval(self) -> None:
        """Load the best epoch's EMA weights; validate them again when they are not the last epoch's."""
        if self._best_state is None:
            return
        self.ema.ema.load_state_dict(self._best_state)
        if self._best_epoch != self.epoch:
            self.metrics, _ = self.validate()

    def trained_model(self) -> nn.Module:
        """The trained module (the best EMA weights, as Ultralytics' ``best.pt`` holds), in train-ready state."""
        model = self.ema.ema
        model = getattr(model, "student_model", model)  # distillation: the teacher and projector are dropped
        for m in model.modules():  # the distillation's feature hooks would follow the module into export / copies
            for key, hook in list(m._forward_hooks.items()):
                if type(hook).__name__ == "FeatureHook":
                    del m._forward_hooks[key]
        if hasattr(model, "criterion"):
            model.criterion = None  # a loss built during validation holds inference tensors: rebuilt when needed
        for name, p in model.named_parameters():
            p.requires_grad_(".dfl" not in name)  # the DFL conv has fixed weights
        return model


KD_MODES = ("head", "features")
HEAD_KD_WEIGHT = 1.0  # the ``dis`` of kd="head" when not given


def head_kd_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], reg_max: int) -> torch.Tensor:
    """Distillation on a detection head's outputs (raw, as the head returns them in training).

    Class logits ``scores`` ``(B, nc, A)``: Bernoulli KL to the teacher's probabilities over every anchor; box side
    distributions ``boxes`` ``(B, 4 * reg_max, A)`` (DFL bins, side-major): KL to the teacher's, per anchor weighted
    by the teacher's top class probability. Both are normalised by the sum of those probabilities, as Ultralytics
    normalises its classification loss by the sum of its target scores. 0 where the student equals the teacher.
    """
    ts, ss = teacher["scores"].detach().float(), student["scores"].float()
    p = ts.sigmoid()
    w = p.amax(1)  # (B, A): how much the teacher sees an object there
    norm = w.sum().clamp_min(1.0)
    cls = (F.binary_cross_entropy_with_logits(ss, p, reduction="none")
           - F.binary_cross_entropy_with_logits(ts, p, reduction="none")).sum()
    b, _, a = ss.shape
    tb = teacher["boxes"].detach().float().view(b, 4, reg_max, -1).log_softmax(2)
    sb = student["boxes"].float().view(b, 4, reg_max, -1).log_softmax(2)
    box = F.kl_div(sb, tb, log_target=True, reduction="none").sum(2).mean(1)  # (B, A)
    return (cls + (box * w).sum()) / norm


@cache
def head_distillation_class() -> type:
    """Ultralytics' ``DistillationModel`` whose training loss is the detection loss + ``dis * head_kd_loss``."""
    from ultralytics.nn.distill_model import DistillationModel

    def loss(self: Any, batch: dict[str, Any], preds: Any = None) -> tuple[torch.Tensor, Any]:
        if not self.training:  # validation: the student's own loss, as Ultralytics does
            return DistillationModel.loss(self, batch, preds)
        with torch.no_grad():
            teacher = self.decouple_outputs(self.teacher_model(batch["img"]), branch="one2many")
        preds = self.student_model(batch["img"])
        regular, items = self.student_model.loss(batch, preds)
        student = self.decouple_outputs(preds, branch="one2many")
        kd = head_kd_loss(student, teacher, self.student_model.model[-1].reg_max).view(1) * self.dis
        items["dis_loss"] = kd.detach()
        return torch.cat([regular, kd * batch["img"].shape[0]]), items

    return type("HeadDistillationModel", (DistillationModel,), {"loss": loss, "__module__": __name__})


@cache
def trainer_class(task: str = "detect") -> type:
    """``PrunedTrainer`` on Ultralytics' trainer for ``task`` (``PrunedDetectionTrainer`` for ``"detect"``)."""
    import_ultralytics()
    from ultralytics import YOLO

    tasks = YOLO.task_map.fget(None)
    if task not in tasks:
        raise ConfigError(f"task {task!r}: no Ultralytics trainer; valid: {sorted(tasks)}")
    base = tasks[task]["trainer"]
    return type(f"Pruned{base.__name__}", (PrunedTrainer, base), {"__module__": __name__})


class _PrunedModel:
    """Mixin for Ultralytics' ``YOLO``: wraps a module in memory (see ``to_yolo``)."""

    def __init__(self, model: nn.Module, task: str | None = None) -> None:
        self.__dict__["_incoming"] = model  # read by _new, which YOLO.__init__ calls for a yaml name
        super().__init__(_yaml_name(model), task=task)

    def _new(self, cfg: str, task: str | None = None, verbose: bool = False) -> None:
        """``Model._new`` without building a model from the yaml: the module given is the model."""
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.nn.tasks import guess_model_task

        model = self.__dict__.pop("_incoming")
        self.cfg, self.model_name = cfg, cfg
        self.task = task or guess_model_task(model)
        self.model = model
        self.overrides["model"], self.overrides["task"] = cfg, self.task
        model.args = {**DEFAULT_CFG_DICT, **self.overrides}
        model.task = self.task

    def export(self, file: str | Path | None = None, **kwargs: Any) -> str:
        """Ultralytics' ``export``; ``file``: where to write (its suffix is the format's), else ``<yaml name>.<fmt>``
        in the current directory, as Ultralytics does."""
        if file is None:
            return super().export(**kwargs)
        self.model.pt_path = str(Path(file).with_suffix(".pt"))  # what the exporter names its output after
        try:
            return super().export(**kwargs)
        finally:
            del self.model.pt_path

    def train(self, trainer: type | None = None, teacher: nn.Module | None = None, kd: str = "head",
              **kwargs: Any) -> Any:
        """Ultralytics' ``train`` keeping the pruned architecture (``PrunedTrainer``), with distillation from
        ``teacher`` if given (``kd``: ``"head"`` or ``"features"``, see ``PrunedTrainer``); no checkpoint is written
        or read back: ``self.model`` becomes the trained module. Returns the validator's metrics."""
        args = {**self.overrides, **kwargs, "task": self.task, "mode": "train"}
        cls = trainer or trainer_class(self.task)
        if not issubclass(cls, PrunedTrainer):
            raise ConfigError(f"trainer={cls.__name__}: it rebuilds the model from its yaml (the unpruned widths); "
                              "pass a PrunedTrainer subclass or leave trainer out")
        self.trainer = cls(self.model, overrides=args, _callbacks=self.callbacks, teacher=teacher, kd=kd)
        self.trainer.train()
        self.model = self.trainer.trained_model()
        self.predictor = None
        self.metrics = getattr(self.trainer.validator, "metrics", None)
        return self.metrics


@cache
def pruned_yolo_class() -> type:
    """``PrunedYOLO``: Ultralytics' ``YOLO`` holding a module given in memory."""
    import_ultralytics()
    from ultralytics import YOLO

    return type("PrunedYOLO", (_PrunedModel, YOLO), {"__module__": __name__})


def to_yolo(model: nn.Module, names: dict[int, str] | list[str] | None = None) -> Any:
    """An Ultralytics ``YOLO`` object whose ``.model`` is ``model`` (pruned or not): ``predict``, ``val``,
    ``export`` and ``train`` work on it, keeping its architecture.

    Args:
        model: an Ultralytics task model (``DetectionModel``, ...), e.g. from ``ultralytics:yolov8n.yaml``.
        names: class names (one per class of the head); default: the model's own.

    Example:
        >>> yolo = to_yolo(model, names=["shirt", "shoe"])
        >>> yolo.export(format="onnx", imgsz=320, file="out/model.onnx")
    """
    tasks = import_ultralytics()
    if not isinstance(model, tasks.BaseModel):
        raise ConfigError(f"to_yolo: model is a {type(model).__name__}; expected an Ultralytics model "
                          "(e.g. prunekit.create_model('ultralytics:yolov8n.yaml'))")
    if names is not None:
        names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
        nc = _num_classes(model)
        if nc is not None and len(names) != nc:
            raise ConfigError(f"names: {len(names)} given, the model's head has {nc} classes")
        model.names = names
    return pruned_yolo_class()(model)


def finetune_yolo(model: nn.Module, data: str | Path, epochs: int = 10, imgsz: int = 640, *,
                  teacher: nn.Module | None = None, kd: str = "head", project: str | Path | None = None,
                  **train_args: Any) -> tuple[nn.Module, dict[str, float]]:
    """Fine-tune ``model`` with Ultralytics' trainer (its loss, augmentation, EMA), keeping its pruned widths.

    Args:
        model: an Ultralytics task model, pruned or not (trained in place; the EMA copy is returned).
        data: a YOLO-format ``data.yaml``; its class count must match the model's head.
        epochs: training epochs.
        imgsz: training and validation image size.
        teacher: a model to distill from (the unpruned one), weight ``dis``.
        kd: ``"head"`` (the head's outputs, ``head_kd_loss``; ``dis`` 1.0 unless given) or ``"features"``
            (Ultralytics' feature distillation, ``dis`` 6.0 unless given).
        project: Ultralytics' run folder (``results.csv``, ``args.yaml``, plots); default a temporary one, deleted.
        **train_args: any Ultralytics train argument (``batch``, ``lr0``, ``workers``, ``val``, ``plots``, ...).

    Returns:
        (the trained module, the final validation metrics: Ultralytics' keys such as ``metrics/mAP50(B)``).

    Example:
        >>> model, metrics = finetune_yolo(pruned, "data.yaml", epochs=5, imgsz=320, batch=16, teacher=dense)
        >>> prunekit.save_model("ft", model)
    """
    _check_data_classes(model, data)
    with tempfile.TemporaryDirectory(prefix="prunekit-yolo-") as tmp:
        yolo = to_yolo(model)
        yolo.train(data=str(data), epochs=int(epochs), imgsz=int(imgsz), project=str(project or tmp), teacher=teacher,
                   kd=kd, **train_args)
        metrics = {k: float(v) for k, v in (yolo.trainer.metrics or {}).items()}
        return yolo.model, metrics


def _check_data_classes(model: nn.Module, data: str | Path) -> None:
    """A ``ConfigError`` when ``data`` is missing or its class count differs from the model's head."""
    import yaml

    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data={str(data)!r}: no such file (expected a YOLO-format data.yaml)")
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    nc = _num_classes(model)
    if names is not None and nc is not None and len(names) != nc:
        raise ConfigError(f"data={str(data)!r}: {len(names)} classes in 'names', the model's head has {nc}; "
                          "build the model with num_classes matching the data")
