"""The train / finetune / eval stages: each reads ``--from DIR`` (except train) and writes one run directory.

Each stage is a plain function of its config, so the CLI, the demo and recipes call the same code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from prunekit import runs
from prunekit.config import Config, section
from prunekit.data import DataArgs, dataset_info, get_dataset, make_loader
from prunekit.data.core import VAL_FRACTION, VAL_SEED, data_settings
from prunekit.errors import ConfigError
from prunekit.measure import count_macs, count_params
from prunekit.models import create_model
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run, write_eval_run
from prunekit.train import TrainSettings, evaluate, fit, is_main_process
from prunekit.train.distributed import is_distributed
from prunekit.train.kd import make_kd_loss
from prunekit.train.qat import QATArgs
from prunekit.train.settings import check_device

log = logging.getLogger(__name__)


class KDArgs(Config):
    """Knowledge distillation from a teacher run (a section of the fine-tuning stages)."""

    kd: bool = Field(False, description="distil from a teacher (default: the unpruned run that --from descends from)")
    teacher: Path | None = Field(None, description="run directory of the teacher for --kd")
    alpha: float = Field(0.7, ge=0, le=1, description="KD: weight of the hard-label cross-entropy")
    temperature: float = Field(2.0, gt=0, description="KD: softmax temperature")


class TrainConfig(Config):
    """``prunekit train``: train a model from the registry on a dataset. Composed of the stage's own options and the
    ``train`` (``TrainSettings``) and ``data`` (``DataArgs``) sections; flags are their flat keys."""

    model: str = Field("resnet20", description="model name: built-in (see `prunekit models`), tv:NAME, timm:NAME, "
                                                "hf:NAME_OR_PATH, or your own module.path:ClassOrFunction (on "
                                                "PYTHONPATH; --model-kwargs go to it)")
    weights: Path | None = Field(None, description="initialise from a local weights file (safetensors or state dict)")
    pretrained: bool = Field(False, description="start from the source's pretrained weights (tv:, timm:, hf:)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments")
    resume: bool = Field(False, description="continue an interrupted run in --out from its last checkpoint")
    out: Path = Field(Path("runs/train"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    train: TrainSettings = section(TrainSettings, "the training")
    data: DataArgs = section(DataArgs, "the data")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from prunekit.models import check_model_name

        return check_model_name(v)


class FinetuneConfig(Config):
    """``prunekit finetune``: recover a pruned model's accuracy (sections ``train``, ``kd``, ``qat``, ``data``)."""

    from_dir: Path = Field(alias="from", description="run directory of the model to fine-tune")
    resume: bool = Field(False, description="continue an interrupted run in --out from its last checkpoint")
    out: Path = Field(Path("runs/finetune"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    train: TrainSettings = section(TrainSettings, "the fine-tuning", epochs=5, lr=0.01)
    kd: KDArgs = section(KDArgs, "distillation")
    qat: QATArgs = section(QATArgs, "quantization-aware fine-tuning (--qat)")
    data: DataArgs = section(DataArgs, "the data")


class EvalConfig(Config):
    """``prunekit eval``: top-1/top-5, loss, MACs and params of a run directory's model (section ``data``)."""

    from_dir: Path = Field(alias="from", description="run directory to evaluate")
    out: Path | None = Field(None, description="also write the results as a run directory here")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    max_batches: int | None = Field(None, gt=0, description="evaluate on at most this many batches")
    text: Path | None = Field(None, description="perplexity of a causal LM (--from: a Hugging Face model folder) on "
                              "this text file, instead of top-1 on the dataset")
    seq_len: int = Field(256, ge=2, description="with --text: tokens per non-overlapping window")
    tokenizer: str = Field("auto", description="with --text: auto (the model folder's tokenizer, else bytes for a "
                           "vocab-256 model), bytes, or a tokenizer folder")
    data: DataArgs = section(DataArgs, "the data")


# ------------------------------------------------------------------------------------------------ shared pieces
def loaders(data: dict[str, Any], batch_size: int, seed: int = 0, workers: int = 0, download: bool = False,
            splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, torch.utils.data.DataLoader]:
    """One loader per split of ``data`` (``data_settings``): ``val`` picks epochs, ``test`` is what stages report."""
    out = {}
    for split in splits:
        ds = get_dataset(data["dataset"], split, data_dir=data["data_dir"], image_size=data["image_size"],
                         download=download, limit=data.get("train_samples") if split == "train" else None,
                         val_fraction=data.get("val_fraction", VAL_FRACTION), val_seed=data.get("val_seed", VAL_SEED))
        # under torchrun only the training set is split across ranks; every rank validates on the full set
        # calib is shuffled too (seeded): its first N batches must be a fair sample of every class
        out[split] = make_loader(ds, batch_size, shuffle=split in ("train", "calib"), seed=seed, drop_last=False,
                                 workers=workers, distributed=is_distributed() and split == "train")
    return out


def test_metrics(model: torch.nn.Module, loader: Any, device: str = "cpu",
                 max_batches: int | None = None) -> dict[str, Any]:
    """``top1``, ``top5`` (percent), ``test_loss`` and ``test_samples`` of ``model`` on the test loader."""
    m = evaluate(model, loader, device, max_batches)
    return {"top1": m["top1"], "top5": m["top5"], "test_loss": m["val_loss"], "test_samples": m["samples"]}


def val_metrics(best: dict[str, Any]) -> dict[str, Any]:
    """``val_top1``, ``val_top5``, ``val_loss`` of the candidate ``fit`` kept (its result)."""
    return {"val_top1": best["top1"], "val_top5": best["top5"], "val_loss": best["val_loss"]}


def split_record(data: dict[str, Any], ld: dict[str, torch.utils.data.DataLoader]) -> dict[str, Any]:
    """The split recipe a run used (for metrics.json): validation fraction and seed, and each split's size."""
    return {"val_fraction": data.get("val_fraction", VAL_FRACTION), "val_seed": data.get("val_seed", VAL_SEED),
            **{k: len(v.dataset) for k, v in ld.items()}}  # type: ignore[arg-type]


def model_metrics(model: torch.nn.Module, spec: runs.ModelSpec, device: str = "cpu") -> dict[str, int]:
    inputs = runs.example_inputs(spec, 1, device)
    return {"macs": count_macs(model, inputs), "params": count_params(model)}


def write_run(out: Path, model: torch.nn.Module, cfg: Any, metrics: dict[str, Any],
              spec: runs.ModelSpec | None = None) -> None:
    """The four data files of a run directory (log.txt is written all along by ``runs.run_log``)."""
    if not is_main_process():
        return
    model_cpu = model.to("cpu")
    runs.save_model(out, model_cpu, spec)
    runs.write_config(out, cfg)
    runs.write_metrics(out, metrics)


def _fmt(m: dict[str, Any]) -> str:
    val = f"val top1 {m['val_top1']:.2f}%  " if "val_top1" in m else ""
    loss = m.get("test_loss", float("nan"))
    return (f"test top1 {m['top1']:.2f}%  top5 {m['top5']:.2f}%  test_loss {loss:.4f}  {val}"
            f"MACs {m['macs'] / 1e6:.2f} M  params {m['params'] / 1e3:.1f} K")


def _detect() -> Any:
    from prunekit.pipeline import detect

    return detect


def _detection(cfg: Any, source: Path | None = None) -> bool:
    """Whether the stage's dataset (or its source run's) is a detection set (``prunekit.pipeline.detect``)."""
    return _detect().is_detection(cfg, source)


# ------------------------------------------------------------------------------------------------ stages
@register("train", TrainConfig, help="Train a model on a dataset and write a run directory", stage="baseline",
          takes_from=False, trains=True)
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and write a run directory. Returns its metrics."""
    from prunekit.models.external import check_image_size, coerce_kwargs

    if _detection(cfg):  # a detection set: Ultralytics' trainer, mAP (prunekit.pipeline.detect)
        return _detect().train_detect(cfg)
    # a ViT built for 224 px fed 16 px digits: one line naming --image-size / --model-kwargs, before any work
    t, d = cfg.train, cfg.data
    check_image_size(cfg.model, data_settings(d)["image_size"], coerce_kwargs(cfg.model_kwargs))
    with stage_run(cfg, "train", reads_run=False, resumable=True) as run:
        out, data = run.out, run.data
        info = dataset_info(data["dataset"])
        num_classes = info.num_classes or len(get_dataset(data["dataset"], "test", data["data_dir"]).classes)
        model = create_model(cfg.model, in_channels=info.in_channels, num_classes=num_classes,
                             pretrained=cfg.pretrained, weights=str(cfg.weights) if cfg.weights else None,
                             **cfg.model_kwargs)
        spec = model.prunekit_spec
        if spec.input.get("kind", "image") == "image":
            spec.input = {"kind": "image", "shape": [1, info.in_channels, data["image_size"], data["image_size"]]}
        log.info("train: %s on %s (%d px), %d epochs, %s lr %g, out %s", cfg.model, data["dataset"],
                 data["image_size"], t.epochs, t.optimizer, t.lr, out)
        ld = loaders(data, d.batch_size, t.seed, d.workers, d.download)
        t0 = time.perf_counter()
        best = fit(model, ld["train"], ld["val"], t, run_dir=out, resume=cfg.resume)
        metrics = {**test_metrics(model, ld["test"], t.device), **val_metrics(best),
                   **model_metrics(model, spec, t.device), "best_epoch": best.get("epoch"),
                   "train_seconds": round(time.perf_counter() - t0, 2), "stage": "train", **data,
                   "splits": split_record(data, ld)}
        log.info("train: done: %s", _fmt(metrics))
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
    return metrics


@register("finetune", FinetuneConfig, help="Fine-tune the model of a run directory (after pruning)",
          stage="finetune", trains=True)
def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune the model of ``cfg.from_dir`` and write a run directory. Returns its metrics."""
    if _detection(cfg, cfg.from_dir):  # a detector (prunekit.pipeline.detect)
        return _detect().finetune_detect(cfg)
    if cfg.qat.qat:  # fake-quantized fine-tuning, exported int8 (prunekit.pipeline.quantize)
        from prunekit.pipeline.quantize import qat_finetune

        return qat_finetune(cfg)
    t, d = cfg.train, cfg.data
    with stage_run(cfg, "finetune", resumable=True) as run:
        out, data, model, spec, before = run.out, run.data, run.model, run.spec, run.before
        log.info("finetune: %s from %s (top1 %.2f%%), %d epochs, %s lr %g", spec.name, cfg.from_dir,
                 before.get("top1", float("nan")), t.epochs, t.optimizer, t.lr)
        loss_fn, teacher_dir = kd_setup(cfg, "finetune")
        sparse = isinstance(before.get("model_sparsity"), (int, float)) and before["model_sparsity"] > 0
        if sparse and not _has_masks(model):
            log.warning("finetune: %s is %.1f%% zeros but holds no masks (sparsified with --permanent): fine-tuning "
                        "fills the zeros in; sparsify without --permanent to keep them through training",
                        cfg.from_dir, 100 * before["model_sparsity"])
        ld = loaders(data, d.batch_size, t.seed, d.workers, d.download)
        start = test_metrics(model, ld["test"], t.device)  # the start is a candidate: its test figure is kept
        t0 = time.perf_counter()
        best = fit(model, ld["train"], ld["val"], t, run_dir=out, resume=cfg.resume, phase="finetune",
                   loss_fn=loss_fn, start_candidate=True)
        metrics = {**test_metrics(model, ld["test"], t.device), **val_metrics(best),
                   **model_metrics(model, spec, t.device), **(_zeros(model) if sparse else {}),
                   "best_epoch": best.get("epoch"), "train_seconds": round(time.perf_counter() - t0, 2),
                   "stage": "finetune", "from": str(cfg.from_dir),
                   **({"teacher": str(teacher_dir)} if teacher_dir else {}), **data, "splits": split_record(data, ld)}
        metrics.update(start_check(start, best, metrics["top1"], "finetune"))
        log.info("finetune: done: %s", _fmt(metrics))
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
    return metrics


def start_check(start: dict[str, Any], best: dict[str, Any], top1: float, stage: str) -> dict[str, Any]:
    """``start_top1`` (test), ``start_val_top1``, ``kept_start`` and ``below_start`` of a fine-tune whose start was a
    candidate (``start``: its test metrics, ``best``: ``fit``'s result, ``top1``: the test top-1 reported). Says so
    loudly when the start was kept or when the reported test top-1 is below the start's."""
    kept = bool(best.get("kept_start"))
    start_val = (best.get("start") or {}).get("top1", float("nan"))
    below = top1 < start["top1"]
    if kept:
        log.warning("%s: KEPT THE START MODEL: no epoch beat it on val (val top1 %.2f%%); test top1 stays %.2f%%",
                    stage, start_val, start["top1"])
    if below:
        log.warning("%s: TEST TOP1 %.2f%% IS BELOW THE START'S %.2f%%: epoch %s won on val (val top1 %.2f%%, start "
                    "%.2f%%) but not on test", stage, top1, start["top1"], best.get("epoch"), best["top1"], start_val)
    return {"start_top1": start["top1"], "start_val_top1": start_val, "kept_start": kept, "below_start": below}


def _has_masks(model: torch.nn.Module) -> bool:
    """Whether a sparsified model still carries its masks (``prunekit.pruning.unstructured`` mask buffers)."""
    from prunekit.pruning.unstructured.masks import masked_layers

    return bool(masked_layers(model))


def _zeros(model: torch.nn.Module) -> dict[str, Any]:
    """``model_sparsity`` (exact zeros / parameters) and ``nonzero_params``, as ``prunekit sparsify`` writes them."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return {"model_sparsity": 1 - nonzero / total if total else 0.0, "nonzero_params": nonzero}


def kd_setup(cfg: Any, stage: str) -> tuple[Any, Path | None]:
    """(loss_fn, teacher_dir) for a stage with ``kd`` and ``train`` sections; (None, None) without ``--kd``."""
    kd, t = cfg.kd, cfg.train
    if not kd.kd:
        if kd.teacher is not None:
            raise ConfigError("--teacher is given but --kd is not; add --kd to distil, or drop --teacher")
        return None, None
    teacher_dir = resolve_teacher(cfg.from_dir, kd.teacher)
    teacher = runs.load_model(teacher_dir, t.device)
    log.info("%s: distilling from %s (alpha %.2f, T %.1f)", stage, teacher_dir, kd.alpha, kd.temperature)
    return make_kd_loss(teacher, kd.alpha, kd.temperature, t.label_smoothing), teacher_dir


def resolve_teacher(from_dir: Path, teacher: Path | None) -> Path:
    """The teacher for KD: ``--teacher``, else the nearest unpruned run among ``from_dir`` and its ancestors (followed
    through the ``from`` key of each run's metrics.json). No loadable teacher is an error, never a silent plain
    fine-tune."""
    if teacher is not None:
        try:
            return runs.check_run_dir(teacher)
        except Exception as e:
            raise ConfigError(f"--teacher {str(teacher)!r}: {e}") from None
    cur, seen = Path(from_dir), set()
    while cur not in seen and (cur / runs.SPEC).is_file():
        seen.add(cur)
        m = runs.read_metrics(cur)
        if m.get("stage") == "train":  # the nearest unpruned ancestor (or --from itself, e.g. for PAT)
            return cur
        if not m.get("from"):
            break
        cur = Path(m["from"])
    raise ConfigError(f"--kd: no teacher found for {str(from_dir)!r} (no unpruned ancestor run directory is "
                      "reachable); pass --teacher DIR")


@register("eval", EvalConfig, help="Evaluate the model of a run directory (top-1/top-5, loss, MACs, params)",
          stage="eval", writes_run=False)
def evaluate_run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run directory's model; with ``cfg.out`` also write the results as a run directory."""
    check_device(cfg.device)
    if cfg.text is None and _detection(cfg, cfg.from_dir):  # a detector: mAP (prunekit.pipeline.detect)
        return _detect().eval_detect(cfg)
    if cfg.text is not None:  # language-model perplexity (prunekit.pipeline.llm)
        from prunekit.pipeline.llm import text_perplexity_run

        return text_perplexity_run(cfg)
    with stage_run(cfg, "eval") as run:  # writes a run directory only with --out
        ld = loaders(run.data, cfg.data.batch_size, splits=("test",), workers=cfg.data.workers,
                     download=cfg.data.download)
        metrics = {**test_metrics(run.model, ld["test"], run.device, cfg.max_batches),
                   **model_metrics(run.model, run.spec, run.device), "stage": "eval", "from": str(cfg.from_dir),
                   **run.data}
        if run.out is not None:
            log.info("eval: %s: %s", cfg.from_dir, _fmt(metrics))
        write_eval_run(run, cfg, metrics)
    return metrics
