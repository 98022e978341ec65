"""The train / prune / finetune / eval stages on a detection dataset (``DatasetInfo.task == "detect"``, e.g. the
generated ``fashion-detect``) with an Ultralytics YOLO model (``ultralytics:yolov8n.yaml``).

The stages of ``prunekit.pipeline.stages`` / ``prune`` hand over here when the run's dataset is a detection set; the
run-directory contract is the same (``model.safetensors`` + ``model.json``, ``config.yaml``, ``metrics.json``,
``log.txt``, ``history.jsonl`` for training stages). What differs:

- training and fine-tuning use Ultralytics' trainer (its loss, augmentation, EMA, schedule) keeping the pruned widths
  (``prunekit.models.ultralytics_io``), with no pickle written; its per-epoch validation on the **val** split picks
  the epoch kept; ``--kd`` distils from the unpruned run through Ultralytics' own feature distillation;
- every stage reports ``map50`` and ``map50_95`` (fractions, COCO's 101-point AP) on the **test** split, from
  prunekit's ``detection_map`` over the model's detections after NMS (confidence 0.001, IoU 0.7, at most 300 per
  image: Ultralytics' validation settings);
- pruning calibrates on the train images (not augmented) and re-estimates BatchNorm as for any model; a gradient
  criterion (``taylor``) gets Ultralytics' detection loss.

Example::

    prunekit train --model ultralytics:yolov8n.yaml --dataset fashion-detect --image-size 64 --epochs 5 --out runs/b
    prunekit prune --from runs/b --criterion variance --target-macs 0.5 --out runs/p
    prunekit finetune --from runs/p --epochs 2 --kd --out runs/ft
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prunekit import runs
from prunekit.data import dataset_info, get_dataset
from prunekit.data.detection_io import DetectionDataset
from prunekit.errors import ConfigError
from prunekit.measure import count_macs, count_params
from prunekit.pipeline.skeleton import stage_run, write_eval_run

log = logging.getLogger(__name__)
NMS = {"conf_thres": 0.001, "iou_thres": 0.7, "max_det": 300}  # Ultralytics' validation settings
_EXPLICIT = {"lr": "lr0", "momentum": "momentum", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
             "patience": "patience"}  # prunekit train flags given on the command line -> Ultralytics train arguments


# ------------------------------------------------------------------------------------------------ dispatch
def is_detection(cfg: Any, source: Path | None = None) -> bool:
    """Whether a stage's dataset (its ``--dataset``, else the source run's) is a detection set."""
    name = getattr(getattr(cfg, "data", None), "dataset", None)
    if name is None and source is not None and (Path(source) / runs.CONFIG).is_file():
        name = runs.read_config(source).get("dataset")
    return bool(name) and dataset_info(name).task == "detect"


def _check_model(name: str) -> None:
    if not str(name).startswith("ultralytics:"):
        raise ConfigError(f"--model {name!r}: a detection dataset needs a detector; valid here: ultralytics:YAML "
                          "(e.g. ultralytics:yolov8n.yaml, ultralytics:yolo11n.yaml)")


def _no_resume(cfg: Any, what: str) -> None:
    if cfg.resume:
        raise ConfigError(f"--resume: a detector's {what} cannot be resumed (Ultralytics' resume reads its pickled "
                          "last.pt, which prunekit does not write); run it again with --overwrite")


# ------------------------------------------------------------------------------------------------ data
def split_dataset(data: dict[str, Any], split: str, limit: int | None = None) -> DetectionDataset:
    """One split of the run's detection set, every image resized to the run's square ``image_size``."""
    ds = get_dataset(data["dataset"], split, data_dir=data["data_dir"], image_size=data["image_size"])
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    if not isinstance(base, DetectionDataset):
        raise ConfigError(f"--dataset {data['dataset']!r}: not a detection set prunekit can read (expected a "
                          "DetectionDataset)")
    out = DetectionDataset(base.data, image_size=data["image_size"])
    if limit is not None and limit < len(out):
        g = torch.Generator().manual_seed(0)
        keep = sorted(torch.randperm(len(out), generator=g)[:limit].tolist())
        out.data = type(base.data)([base.data.samples[i] for i in keep], base.data.names, base.data.root,
                                   base.data.yaml_path, base.data.meta)
    return out


def collate_yolo(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (B, 3, H, W), targets (M, 6))``: one row per object, ``batch_idx, cls, cx, cy, w, h`` normalised to
    the image (Ultralytics' layout, and a tensor, so that calibration can move it to a device)."""
    images = torch.stack([b[0] for b in batch])
    h, w = images.shape[-2:]
    rows = []
    for i, (_, t) in enumerate(batch):
        b = t["boxes"].float()
        xywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h, (b[:, 2] - b[:, 0]) / w,
                            (b[:, 3] - b[:, 1]) / h], 1)
        rows.append(torch.cat([torch.full((len(b), 1), float(i)), t["labels"].float().view(-1, 1), xywh], 1))
    return images, torch.cat(rows) if rows else torch.zeros(0, 6)


def loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate_yolo)


def data_yaml(data: dict[str, Any], folder: Path) -> Path:
    """The ``data.yaml`` Ultralytics trains on: the set's own, or (``train_samples``) one in ``folder`` whose train
    split lists that fixed subset of the training images."""
    import yaml

    base = get_dataset(data["dataset"], "val", data_dir=data["data_dir"], image_size=data["image_size"])
    src = getattr(base, "yaml_path", None)
    if src is None:
        raise ConfigError(f"--dataset {data['dataset']!r}: has no data.yaml for Ultralytics' trainer")
    if not data.get("train_samples"):
        return Path(src)
    train = split_dataset(data, "train", data["train_samples"])
    (folder / "train.txt").write_text("".join(f"{s.image}\n" for s in train.data.samples))
    spec = yaml.safe_load(Path(src).read_text())
    root = Path(spec.get("path") or Path(src).parent)
    spec.update(path=str(root), train=str(folder / "train.txt"))
    out = folder / "data.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


# ------------------------------------------------------------------------------------------------ metrics
def predictions(output: Any) -> torch.Tensor:
    """The decoded predictions ``(B, 4 + nc, anchors)`` of a YOLO model's eval output (``(y, raw)`` or ``y``)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def test_detection(model: nn.Module, ds: Dataset, device: str = "cpu", batch_size: int = 32,
                   max_batches: int | None = None) -> dict[str, Any]:
    """``map50``, ``map50_95`` (COCO AP, fractions) and ``test_samples`` of ``model`` on ``ds`` (its test split)."""
    from ultralytics.utils.nms import non_max_suppression

    from prunekit.measure.detection import detection_map

    was = model.training
    model.eval()
    preds, gts = [], []
    for k, (images, targets) in enumerate(loader(ds, batch_size)):
        if max_batches is not None and k >= max_batches:
            break
        dets = non_max_suppression(predictions(model(images.to(device))), **NMS)
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        for i, d in enumerate(dets):
            t = targets[targets[:, 0] == i]
            cx, cy, bw, bh = (t[:, 2:] * scale).unbind(1)
            gts.append({"boxes": torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1),
                        "labels": t[:, 1].long()})
            d = d.cpu()
            preds.append({"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()})
    model.train(was)
    m = detection_map(preds, gts, num_classes=getattr(ds, "num_classes", None))
    return {"map50": m.map50, "map50_95": m.map50_95, "test_samples": len(gts)}


def size_metrics(model: nn.Module, spec: runs.ModelSpec, device: str = "cpu") -> dict[str, int]:
    return {"macs": count_macs(model, runs.example_inputs(spec, 1, device)), "params": count_params(model)}


def fmt(m: dict[str, Any]) -> str:
    val = f"  val mAP50-95 {m['val_map50_95']:.3f}" if m.get("val_map50_95") is not None else ""
    return (f"test mAP50 {m['map50']:.3f}  mAP50-95 {m['map50_95']:.3f}{val}  MACs {m['macs'] / 1e6:.2f} M  "
            f"params {m['params'] / 1e3:.1f} K")


# ------------------------------------------------------------------------------------------------ loss (taylor)
def yolo_loss_fn(model: nn.Module) -> Any:
    """``loss_fn(outputs, targets)`` for gradient criteria: Ultralytics' detection loss of the raw head outputs
    against ``collate_yolo``'s targets (its box / cls / DFL weights: the trainer's defaults)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.utils.loss import v8DetectionLoss

    state: dict[str, Any] = {}

    def loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if "crit" not in state:  # built on first use: the head's device and (unchanged) output widths
            shim = SimpleNamespace(args=SimpleNamespace(**DEFAULT_CFG_DICT), model=model.model,
                                   parameters=model.parameters)
            state["crit"] = v8DetectionLoss(shim)
        raw = outputs[1] if isinstance(outputs, (tuple, list)) else outputs
        batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:]}
        total, _ = state["crit"](raw, batch)
        return total.sum()

    return loss


# ------------------------------------------------------------------------------------------------ training
def yolo_train_args(cfg: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Ultralytics train arguments from a stage's ``train`` and ``data`` sections; flags left at their defaults
    leave Ultralytics' own choice (optimizer ``auto``, its learning rate and warm-up)."""
    t, d = cfg.train, cfg.data
    args = {"batch": d.batch_size, "workers": d.workers, "seed": t.seed, "deterministic": True, "plots": False,
            "amp": bool(t.amp), "device": "cpu" if t.device == "cpu" else t.device.replace("cuda:", ""),
            "verbose": False}
    given = t.model_fields_set
    if "optimizer" in given or "lr" in given:
        args["optimizer"] = {"sgd": "SGD", "adamw": "AdamW"}[t.optimizer]
    args.update({ours: getattr(t, key) for key, ours in _EXPLICIT.items()
                 if key in given and getattr(t, key) is not None})
    return args


def fit_yolo(model: nn.Module, cfg: Any, data: dict[str, Any], out: Path, phase: str,
             teacher: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` with Ultralytics' trainer for ``cfg.train.epochs`` (val picks the epoch); writes
    ``history.jsonl`` into ``out``. Returns (the trained model: the best EMA weights, val metrics)."""
    from prunekit.models.ultralytics_io import to_yolo

    with tempfile.TemporaryDirectory(prefix="prunekit-yolo-") as tmp:
        yaml_path = data_yaml(data, Path(tmp))
        yolo = to_yolo(model)
        yolo.train(data=str(yaml_path), epochs=cfg.train.epochs, imgsz=data["image_size"], project=tmp,
                   name="run", teacher=teacher, **yolo_train_args(cfg, data))
        trainer = yolo.trainer
        _history(Path(trainer.save_dir) / "results.csv", out, phase)
        m = trainer.metrics or {}
        val = {"val_map50": float(m.get("metrics/mAP50(B)", float("nan"))),
               "val_map50_95": float(m.get("metrics/mAP50-95(B)", float("nan"))),
               "best_epoch": int(trainer._best_epoch) + 1 if trainer._best_epoch >= 0 else None}
    return yolo.model.float().eval(), val


def _history(csv_path: Path, out: Path, phase: str) -> None:
    """Ultralytics' ``results.csv`` as ``history.jsonl`` lines: epoch, training losses, val mAP."""
    import csv

    if not csv_path.is_file():
        return
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            r = {k.strip(): v for k, v in row.items()}
            losses = {k.split("/")[1]: float(v) for k, v in r.items() if k.startswith("train/")}
            runs.append_history(out, {"phase": phase, "epoch": int(float(r["epoch"])),
                                      "train_loss": sum(losses.values()), **losses,
                                      "val_map50": float(r.get("metrics/mAP50(B)", "nan")),
                                      "val_map50_95": float(r.get("metrics/mAP50-95(B)", "nan"))})


# ------------------------------------------------------------------------------------------------ stages
def train_detect(cfg: Any) -> dict[str, Any]:
    """``prunekit train`` on a detection set: an Ultralytics model trained by Ultralytics' trainer."""
    from prunekit.models import create_model
    from prunekit.pipeline.stages import write_run

    _check_model(cfg.model)
    _no_resume(cfg, "training")
    with stage_run(cfg, "train", reads_run=False) as run:
        out, data = run.out, run.data
        test = split_dataset(data, "test")
        kwargs = {"image_size": data["image_size"], **cfg.model_kwargs}
        model = create_model(cfg.model, in_channels=3, num_classes=test.num_classes, pretrained=cfg.pretrained,
                             weights=str(cfg.weights) if cfg.weights else None, **kwargs)
        spec = model.prunekit_spec
        log.info("train: %s on %s (%d px), %d epochs (Ultralytics' trainer), out %s", cfg.model, data["dataset"],
                 data["image_size"], cfg.train.epochs, out)
        t0 = time.perf_counter()
        model, val = fit_yolo(model, cfg, data, out, "train")
        metrics = {**test_detection(model, test, run.device, cfg.data.batch_size), **val,
                   **size_metrics(model, spec, run.device), "train_seconds": round(time.perf_counter() - t0, 2),
                   "stage": "train", "task": "detect", **data}
        log.info("train: done: %s", fmt(metrics))
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
    return metrics


def finetune_detect(cfg: Any) -> dict[str, Any]:
    """``prunekit finetune`` of a detector: Ultralytics' trainer at the pruned widths, ``--kd``: distilled from the
    unpruned run (Ultralytics' feature distillation; ``--alpha`` / ``--temperature`` do not apply)."""
    from prunekit.pipeline.stages import resolve_teacher, write_run

    if cfg.qat.qat:
        raise ConfigError("--qat: quantization-aware fine-tuning is not available for a detector; fine-tune without "
                          "--qat, then `prunekit quantize`")
    _no_resume(cfg, "fine-tuning")
    if cfg.kd.teacher is not None and not cfg.kd.kd:
        raise ConfigError("--teacher is given but --kd is not; add --kd to distil, or drop --teacher")
    with stage_run(cfg, "finetune") as run:
        out, data, model, spec, before = run.out, run.data, run.model, run.spec, run.before
        teacher_dir = resolve_teacher(cfg.from_dir, cfg.kd.teacher) if cfg.kd.kd else None
        teacher = runs.load_model(teacher_dir, run.device) if teacher_dir else None
        log.info("finetune: %s from %s (test mAP50-95 %.3f), %d epochs%s", spec.name, cfg.from_dir,
                 before.get("map50_95", float("nan")), cfg.train.epochs,
                 f", distilled from {teacher_dir}" if teacher_dir else "")
        test = split_dataset(data, "test")
        start = test_detection(model, test, run.device, cfg.data.batch_size)
        t0 = time.perf_counter()
        model, val = fit_yolo(model, cfg, data, out, "finetune", teacher)
        metrics = {**test_detection(model, test, run.device, cfg.data.batch_size), **val,
                   **size_metrics(model, spec, run.device), "train_seconds": round(time.perf_counter() - t0, 2),
                   "start_map50": start["map50"], "start_map50_95": start["map50_95"], "stage": "finetune",
                   "task": "detect", "from": str(cfg.from_dir),
                   **({"teacher": str(teacher_dir)} if teacher_dir else {}), **data}
        log.info("finetune: done: %s", fmt(metrics))
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
    return metrics


def prune_detect(cfg: Any) -> dict[str, Any]:
    """``prunekit prune`` of a detector: calibration on the train images (not augmented), BN re-estimated, mAP on
    the test split before and after."""
    from prunekit._io import atomic_write_json
    from prunekit.pipeline.prune import REPORT, _with_caps
    from prunekit.pruning.structured import prune_with_settings

    p = cfg.prune
    with stage_run(cfg, "prune") as run:
        out, data, device, model, spec, before = run.out, run.data, run.device, run.model, run.spec, run.before
        calib = loader(split_dataset(data, "calib"), cfg.data.batch_size, shuffle=True, seed=cfg.seed)
        log.info("prune: %s from %s (test mAP50-95 %.3f), %s, target_macs %s", spec.name, cfg.from_dir,
                 before.get("map50_95", float("nan")), p.criterion, p.target.macs)
        t0 = time.perf_counter()
        report = prune_with_settings(model, run.example_inputs(), _with_caps(cfg), calib_data=calib, device=device,
                                     loss_fn=yolo_loss_fn(model))
        seconds = time.perf_counter() - t0
        metrics = {**test_detection(model, split_dataset(data, "test"), device, cfg.data.batch_size),
                   "macs": report.macs_after, "params": report.params_after, "macs_before": report.macs_before,
                   "params_before": report.params_before, "macs_kept": report.macs_kept,
                   "params_kept": report.params_kept, "ratio": report.ratio, "target_macs": p.target.macs,
                   "criterion": report.criterion, "scope": p.layers.scope, "compensate": report.compensate,
                   "groups_pruned": report.groups_pruned, "groups_left_whole": len(report.left_whole),
                   "bn_recalibration_batches": report.bn_recalibration.get("batches", 0),
                   "map50_before": before.get("map50"), "map50_95_before": before.get("map50_95"),
                   "prune_seconds": round(seconds, 2), "stage": "prune", "task": "detect",
                   "from": str(cfg.from_dir), **data}
        log.info("prune: done: %s (was %.3f), %.1f%% of the MACs kept", fmt(metrics),
                 before.get("map50_95", float("nan")), 100 * report.macs_kept)
        runs.save_model(out, model.to("cpu"), spec)
        runs.write_config(out, {**cfg.to_dict(), **data})
        runs.write_metrics(out, metrics)
        atomic_write_json(out / REPORT, report.to_dict())
    return metrics


def eval_detect(cfg: Any) -> dict[str, Any]:
    """``prunekit eval`` of a detector: mAP on the test split, MACs, params."""

    with stage_run(cfg, "eval") as run:
        metrics = {**test_detection(run.model, split_dataset(run.data, "test"), run.device, cfg.data.batch_size,
                                    cfg.max_batches),
                   **size_metrics(run.model, run.spec, run.device), "stage": "eval", "task": "detect",
                   "from": str(cfg.from_dir), **run.data}
        if run.out is not None:
            log.info("eval: %s: %s", cfg.from_dir, fmt(metrics))
        write_eval_run(run, cfg, metrics)
    return metrics


def export_form(model: nn.Module) -> nn.Module:
    """An Ultralytics model set to return its decoded predictions alone (``(B, 4 + nc, anchors)``, the head's
    ``export`` mode, as Ultralytics exports it) instead of ``(predictions, raw head outputs)``; other models as they
    are. In place; returns ``model``."""
    import sys

    if "ultralytics.nn.modules" not in sys.modules:
        return model
    from ultralytics.nn.modules.head import Detect

    for m in model.modules():
        if isinstance(m, Detect):
            m.export, m.format = True, "onnx"
    return model
