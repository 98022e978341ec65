"""Flat training and evaluation loops (torchvision-references style) with resumable, atomic checkpoints."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit import runs
from prunekit._io import atomic_write, atomic_write_text
from prunekit.batch import split_batch as _split_batch
from prunekit.batch import to_device as _to_device
from prunekit.data.core import set_loader_epoch
from prunekit.distributed import is_distributed, rank, sync_buffers
from prunekit.measure.macs import call_model
from prunekit.train.checkpoint import RESUME_FREE, finish_run, load_checkpoint, resume_fingerprint  # noqa: F401
from prunekit.train.settings import TrainSettings

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (outputs, targets, inputs) -> loss


# ------------------------------------------------------------------------------------------------ helpers
def to_device(x: Any, device: torch.device | str) -> Any:
    """The training loop's copy to ``device`` (non-blocking from pinned memory)."""
    return _to_device(x, device, non_blocking=True)


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels) of a training batch: a tensor, an ``(x, y, *rest)`` tuple or a dict with ``labels``."""
    return _split_batch(batch, strict=False)


def is_main_process() -> bool:
    return rank() == 0


def _all_reduce_sum(values: list[float], device: torch.device | str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov and s.momentum > 0,
                               weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


# ------------------------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
             max_batches: int | None = None, reduce: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over ``loader``.

    ``reduce=True`` sums the counts over torchrun ranks (for a loader split across ranks).

    Example:
        >>> evaluate(model, val_loader)  # {'top1': 97.5, 'top5': 100.0, 'val_loss': 0.08, 'samples': 360}
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch)
        x, y = to_device(x, device), y.to(device)
        out = call_model(model, x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        n += y.shape[0]
    model.train(was_training)
    if reduce and is_distributed():
        correct1, correct5, loss_sum, n = _all_reduce_sum([correct1, correct5, loss_sum, n], device)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "val_loss": float("nan"), "samples": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "val_loss": loss_sum / n, "samples": int(n)}


# ------------------------------------------------------------------------------------------------ train
def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


class _Progress:
    """About 20 log lines per epoch (throttled to one a second), or a rich progress bar on a terminal."""

    def __init__(self, total: int, epoch: int, epochs: int, phase: str):
        self.total, self.epoch, self.epochs, self.phase = total, epoch, epochs, phase
        self.every = max(1, total // 20)
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stdout.isatty() and os.environ.get("PRUNEKIT_NO_BAR") is None and log.isEnabledFor(logging.INFO):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"{phase} {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("", total=total, info="")
            self.bar.start()

    def update(self, i: int, loss: float, lr: float, seen: int) -> None:
        info = f"loss {loss:.4f} lr {lr:.3g}"
        if self.bar is not None:
            self.bar.update(self.task, completed=i, info=info)
            return
        now = time.perf_counter()
        if (i % self.every == 0 and now - self.last >= 1.0) or i == self.total:
            rate = seen / max(1e-9, now - self.t0)
            log.info("%s %d/%d [%d/%d] %s %.0f samples/s", self.phase, self.epoch, self.epochs, i, self.total, info,
                     rate)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Any,
                    s: TrainSettings, epoch: int, loss_fn: LossFn, callbacks: Sequence[Any] = (),
                    scaler: Any = None, step0: int = 0, ema: nn.Module | None = None, phase: str = "train") -> float:
    model.train()
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # for callbacks / EMA
    device = s.device
    use_amp = scaler is not None
    total = len(loader)  # type: ignore[arg-type]
    prog = _Progress(total, epoch + 1, s.epochs, phase)
    loss_sum, seen = 0.0, 0
    try:
        for i, batch in enumerate(loader, 1):
            x, y = split_batch(batch)
            x, y = to_device(x, device), y.to(device)
            with torch.autocast("cuda", enabled=use_amp):
                out = call_model(model, x)
                loss = loss_fn(out, y, x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{phase}: loss is {loss.item()} at epoch {epoch + 1}, batch {i}; "
                                         "lower --lr or set --grad-clip")
            optimizer.zero_grad(set_to_none=True)
            if use_amp:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if s.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            _call(callbacks, "on_before_optimizer_step", base, step0 + i)
            if use_amp:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            _call(callbacks, "on_after_optimizer_step", base, step0 + i)
            if ema is not None:
                _update_ema(ema, base, s.ema or 0.999)
            bs = y.shape[0]
            loss_sum += loss.item() * bs
            seen += bs
            prog.update(i, loss.item(), optimizer.param_groups[0]["lr"], seen)
    finally:
        prog.close()
    return loss_sum / max(1, seen)


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def default_loss(s: TrainSettings) -> LossFn:
    return lambda out, y, x: F.cross_entropy(out, y, label_smoothing=s.label_smoothing)


@dataclass
class _Best:
    """The best candidate so far (highest val top-1; a tie keeps the earlier one) and the epochs since it improved."""

    metrics: dict[str, Any] | None = None
    state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0

    def offer(self, m: dict[str, Any], epoch: int, model: nn.Module) -> bool:
        improved = self.metrics is None or m["top1"] > self.metrics["top1"]
        if improved:
            self.metrics = {**m, "epoch": epoch}
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved


@dataclass
class _Run:
    """What one ``fit`` call trains with: the model (and its DDP wrapper), optimizer, schedule, scaler and EMA."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: nn.Module | None
    steps_per_epoch: int

    @property
    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model


def _setup(model: nn.Module, train_loader: Iterable, s: TrainSettings, device: torch.device) -> _Run:
    model.to(device)
    net = model
    if is_distributed():  # torchrun: gradients averaged across ranks; `model` stays the plain module
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = len(train_loader)  # type: ignore[arg-type]
    optimizer = make_optimizer(model, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(s.epochs * steps, int(s.warmup_epochs * steps), s.min_lr / s.lr))
    scaler = None
    if s.amp:
        if device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        else:
            warnings.warn("--amp is for CUDA; training in fp32 on the CPU", stacklevel=3)
    ema = copy.deepcopy(model).eval() if s.ema else None
    return _Run(model, net, optimizer, scheduler, scaler, ema, steps)


def _resume(r: _Run, run_dir: str | Path, device: torch.device, fingerprint: dict[str, Any], phase: str,
            epochs: int) -> tuple[int, _Best, dict[str, Any] | None]:
    """Load ``last.ckpt`` into ``r``: (epochs done, best so far, the start candidate's val metrics)."""
    ck = load_checkpoint(Path(run_dir) / runs.CKPT, device, fingerprint, r.model)
    r.optimizer.load_state_dict(ck["optimizer"])
    r.scheduler.load_state_dict(ck["scheduler"])
    if r.ema is not None and "ema" in ck:
        r.ema.load_state_dict(ck["ema"])
    start = ck["epoch"]
    log.info("%s: resuming from %s at epoch %d/%d", phase, Path(run_dir) / runs.CKPT, start + 1, epochs)
    # a kill between the history line and the checkpoint would leave a line for an epoch that is redone
    kept = [h for h in runs.read_history(run_dir) if h.get("phase") != phase or h.get("epoch", 0) <= start]
    atomic_write_text(Path(run_dir) / runs.HISTORY, "".join(json.dumps(h) + "\n" for h in kept))
    return start, _Best(ck["best"], ck["best_model"], ck["bad_epochs"]), ck.get("start")


def _save_checkpoint(r: _Run, path: Path, epoch: int, best: _Best, start_m: dict[str, Any] | None,
                     fingerprint: dict[str, Any]) -> None:
    state = {"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
             "scheduler": r.scheduler.state_dict(), "epoch": epoch, "best": best.metrics, "best_model": best.state,
             "bad_epochs": best.bad_epochs, "settings": fingerprint}
    if start_m is not None:
        state["start"] = start_m
    if r.ema is not None:
        state["ema"] = r.ema.state_dict()
    atomic_write(path, lambda tmp, st=state: torch.save(st, tmp))


def _epoch(r: _Run, train_loader: Iterable, val_loader: Iterable, s: TrainSettings, epoch: int, loss_fn: LossFn,
           callbacks: Sequence[Any], phase: str, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """One training epoch then the val evaluation: (val metrics, history row)."""
    t0 = time.perf_counter()
    torch.manual_seed(s.seed * 1000 + epoch)  # augmentation / dropout randomness: a function of (seed, epoch)
    set_loader_epoch(train_loader, epoch)  # type: ignore[arg-type]
    lr = r.optimizer.param_groups[0]["lr"]
    train_loss = train_one_epoch(r.net, train_loader, r.optimizer, r.scheduler, s, epoch, loss_fn, callbacks,
                                 r.scaler, step0=epoch * r.steps_per_epoch, ema=r.ema, phase=phase)
    _call(callbacks, "on_before_eval", r.eval_model, epoch + 1)  # e.g. BatchNorm re-estimated after a prune
    sync_buffers(r.eval_model)  # torchrun: BatchNorm statistics drifted apart in each rank's last steps
    m = evaluate(r.eval_model, val_loader, device)
    row = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "val_loss": m["val_loss"], "top1": m["top1"],
           "top5": m["top5"], "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
    return m, row


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable, settings: TrainSettings,
        run_dir: str | Path | None = None, resume: bool = False, callbacks: Sequence[Any] = (),
        loss_fn: LossFn | None = None, phase: str = "train", start_candidate: bool = False) -> dict[str, Any]:
    """Train with a per-batch cosine schedule, keep the best model by top-1 on ``val_loader`` (the validation split,
    never the test split), checkpoint every epoch; ``settings.patience`` stops early on the same figure.

    With ``start_candidate=True`` (every fine-tune) the model as given is evaluated first (epoch 0) and stays unless
    an epoch beats it on val; keeping it is logged as a warning. The checkpoint (``run_dir/last.ckpt``) is written
    atomically and holds the model, optimizer, scheduler and best-so-far state; ``resume=True`` continues from it,
    giving the same weights as an uninterrupted run. On return the model holds the best weights.

    Returns:
        The best candidate's val metrics (``top1``, ``top5``, ``val_loss``, ``epoch``: 0 for the start), plus
        ``epochs_run``, and with ``start_candidate`` ``start`` (the start's val metrics) and ``kept_start``.

    Example:
        >>> fit(model, train_loader, val_loader, TrainSettings(epochs=5, lr=0.05), run_dir="runs/base")
    """
    s, device = settings, torch.device(settings.device)
    r = _setup(model, train_loader, s, device)
    loss_fn = loss_fn or default_loss(s)
    ckpt_path = Path(run_dir) / runs.CKPT if run_dir else None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    start, best, start_m = 0, _Best(), None
    fingerprint = resume_fingerprint(s)
    if resume and ckpt_path is not None and ckpt_path.is_file():
        start, best, start_m = _resume(r, run_dir, device, fingerprint, phase, s.epochs)  # type: ignore[arg-type]
    elif resume and ckpt_path is not None:
        log.warning("%s: --resume given but %s does not exist; starting from the beginning", phase, ckpt_path)
    if start_candidate and start == 0:
        start_m = evaluate(r.eval_model, val_loader, device)
        best.offer(start_m, 0, r.eval_model)
        log.info("%s 0/%d: start model: val_loss %.4f top1 %.2f top5 %.2f (a candidate)", phase, s.epochs,
                 start_m["val_loss"], start_m["top1"], start_m["top5"])
    mirror = runs.tensorboard_mirror(run_dir, s.tensorboard) if run_dir is not None else contextlib.nullcontext()
    with mirror:  # --tensorboard: the history lines also go to TensorBoard
        for epoch in range(start, s.epochs):
            m, row = _epoch(r, train_loader, val_loader, s, epoch, loss_fn, callbacks, phase, device)
            improved = best.offer(m, epoch + 1, r.eval_model)
            log.info("%s %d/%d: train_loss %.4f val_loss %.4f val top1 %.2f top5 %.2f (%.1fs)%s", phase, epoch + 1,
                     s.epochs, row["train_loss"], m["val_loss"], m["top1"], m["top5"], row["seconds"],
                     " *best*" if improved else "")
            _call(callbacks, "on_epoch_end", model, epoch + 1, m)
            if run_dir is not None and is_main_process():
                runs.append_history(run_dir, row)
                _save_checkpoint(r, ckpt_path, epoch + 1, best, start_m, fingerprint)  # type: ignore[arg-type]
            if s.patience and best.bad_epochs >= s.patience:
                log.info("%s: early stopping after %d epochs without improvement on val", phase, best.bad_epochs)
                break
    return _finish(model, best, start_m, val_loader, device, s.epochs - start, phase)


def _finish(model: nn.Module, best: _Best, start_m: dict[str, Any] | None, val_loader: Iterable,
            device: torch.device, epochs_run: int, phase: str) -> dict[str, Any]:
    if best.state is not None:
        model.load_state_dict(best.state)
    result = dict(best.metrics or evaluate(model, val_loader, device))
    result["epochs_run"] = epochs_run
    if start_m is not None:
        result["start"] = start_m
        result["kept_start"] = result.get("epoch") == 0
        if result["kept_start"] and epochs_run > 0:
            log.warning("%s: NO EPOCH BEAT THE STARTING MODEL on val (top1 %.2f%%): keeping the start model, "
                        "the fine-tuning changed nothing", phase, start_m["top1"])
    return result
