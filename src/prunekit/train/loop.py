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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit import runs
from prunekit._io import atomic_write, atomic_write_text
from prunekit.data.core import set_loader_epoch
from prunekit.measure.macs import call_model
from prunekit.train.distributed import is_distributed, rank, sync_buffers
from prunekit.train.settings import TrainSettings

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (outputs, targets, inputs) -> loss


# ------------------------------------------------------------------------------------------------ helpers
def to_device(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels) from a batch that is a tensor, an (x, y) pair, or a dict with an optional 'labels' key."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        b = dict(batch)
        y = b.pop("labels", None)
        return b, y
    return batch, None


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


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable, settings: TrainSettings,
        run_dir: str | Path | None = None, resume: bool = False, callbacks: Sequence[Any] = (),
        loss_fn: LossFn | None = None, phase: str = "train") -> dict[str, Any]:
    """Train with a per-batch cosine schedule, keep the best model (by val top-1), checkpoint every epoch.

    The checkpoint (``run_dir/last.ckpt``) is written atomically and holds the model, optimizer, scheduler and
    best-so-far state; ``resume=True`` continues from it, giving the same weights as an uninterrupted run (batch order
    and augmentation are seeded by (seed, epoch)). On return the model holds the best weights and the checkpoint is
    removed. Returns the best epoch's metrics plus ``epochs_run``.

    Example:
        >>> fit(model, train_loader, val_loader, TrainSettings(epochs=5, lr=0.05), run_dir="runs/base")
    """
    s = settings
    device = torch.device(s.device)
    model.to(device)
    loss_fn = loss_fn or default_loss(s)
    net = model
    if is_distributed():  # torchrun: gradients averaged across ranks; `model` stays the plain module
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    optimizer = make_optimizer(model, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(s.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch), s.min_lr / s.lr))
    scaler = None
    if s.amp:
        if device.type == "cuda":
            scaler = torch.amp.GradScaler("cuda")
        else:
            warnings.warn("--amp is for CUDA; training in fp32 on the CPU", stacklevel=2)
    ema = copy.deepcopy(model).eval() if s.ema else None
    ckpt_path = Path(run_dir) / runs.CKPT if run_dir else None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    start, best, best_state, bad_epochs = 0, None, None, 0
    fingerprint = resume_fingerprint(s)
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, device, fingerprint, model)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and "ema" in ck:
            ema.load_state_dict(ck["ema"])
        start, best, best_state, bad_epochs = ck["epoch"], ck["best"], ck["best_model"], ck["bad_epochs"]
        log.info("%s: resuming from %s at epoch %d/%d", phase, ckpt_path, start + 1, s.epochs)
        # a kill between the history line and the checkpoint would leave a line for an epoch that is redone
        kept = [r for r in runs.read_history(run_dir) if r.get("phase") != phase or r.get("epoch", 0) <= start]
        atomic_write_text(Path(run_dir) / runs.HISTORY, "".join(json.dumps(r) + "\n" for r in kept))
    elif resume and ckpt_path is not None:
        log.warning("%s: --resume given but %s does not exist; starting from the beginning", phase, ckpt_path)

    mirror = runs.tensorboard_mirror(run_dir, s.tensorboard) if run_dir is not None else contextlib.nullcontext()
    with mirror:  # --tensorboard: the history lines also go to TensorBoard
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(s.seed * 1000 + epoch)  # augmentation / dropout randomness: a function of (seed, epoch)
            set_loader_epoch(train_loader, epoch)  # type: ignore[arg-type]
            lr = optimizer.param_groups[0]["lr"]
            train_loss = train_one_epoch(net, train_loader, optimizer, scheduler, s, epoch, loss_fn, callbacks, scaler,
                                         step0=epoch * steps_per_epoch, ema=ema, phase=phase)
            eval_model = ema if ema is not None else model
            _call(callbacks, "on_before_eval", eval_model, epoch + 1)  # e.g. BatchNorm re-estimated after a prune
            sync_buffers(eval_model)  # torchrun: BatchNorm statistics drifted apart in each rank's last steps
            m = evaluate(eval_model, val_loader, device)
            secs = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "phase": phase, "train_loss": train_loss, "val_loss": m["val_loss"],
                   "top1": m["top1"], "top5": m["top5"], "lr": lr, "seconds": round(secs, 3)}
            improved = best is None or m["top1"] > best["top1"]
            if improved:
                best = {**m, "epoch": epoch + 1}
                best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
                bad_epochs = 0
            else:
                bad_epochs += 1
            log.info("%s %d/%d: train_loss %.4f val_loss %.4f top1 %.2f top5 %.2f (%.1fs)%s", phase, epoch + 1,
                     s.epochs, train_loss, m["val_loss"], m["top1"], m["top5"], secs, " *best*" if improved else "")
            _call(callbacks, "on_epoch_end", model, epoch + 1, m)
            if run_dir is not None and is_main_process():
                runs.append_history(run_dir, row)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best": best,
                         "best_model": best_state, "bad_epochs": bad_epochs, "settings": fingerprint}
                if ema is not None:
                    state["ema"] = ema.state_dict()
                atomic_write(ckpt_path, lambda tmp, st=state: torch.save(st, tmp))
            if s.patience and bad_epochs >= s.patience:
                log.info("%s: early stopping after %d epochs without improvement", phase, bad_epochs)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result = dict(best or evaluate(model, val_loader, device))
    result["epochs_run"] = s.epochs - start
    return result


# settings that may change between a run and its resumption without changing what is trained
RESUME_FREE = frozenset({"resume", "overwrite", "out", "device", "workers", "tensorboard", "download", "data_dir"})


def resume_fingerprint(s: Any) -> dict[str, Any]:
    """The settings a checkpoint was trained with (JSON values), less ``RESUME_FREE``: resuming with other values
    (epochs, lr, model, data...) would silently mix two runs."""
    d = s.to_dict() if hasattr(s, "to_dict") else dict(vars(s))
    return {k: v for k, v in d.items() if k not in RESUME_FREE}


def load_checkpoint(path: Path, device: torch.device, fingerprint: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``last.ckpt`` for ``--resume`` (``weights_only``), checked: readable, written with these settings, for this
    model. Each failure is a ``RunDirError`` / ``ConfigError`` that says what differs and what to do."""
    from prunekit.errors import ConfigError, RunDirError

    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise RunDirError(f"--resume: {str(path)!r} cannot be read ({type(e).__name__}: {e}); it is damaged: pass "
                          "--overwrite to start the run again, or choose another --out") from None
    if not isinstance(ck, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(ck):
        raise RunDirError(f"--resume: {str(path)!r} is not a prunekit training checkpoint (keys "
                          f"{sorted(ck) if isinstance(ck, dict) else type(ck).__name__}); pass --overwrite to start "
                          "again")
    saved = ck.get("settings")  # absent in checkpoints of older versions: not checked
    if saved is not None:
        diff = {k: (saved.get(k), fingerprint.get(k)) for k in sorted(set(saved) | set(fingerprint))
                if saved.get(k) != fingerprint.get(k)}
        if diff:
            said = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
            raise ConfigError(f"--resume: {str(path)!r} was written with other settings ({said}); resume with the "
                              "checkpoint's values, or pass --overwrite to start again with the new ones")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise ConfigError(f"--resume: {str(path)!r} does not fit this model ({' '.join(first)[:300]}); resume with "
                          "the --model the run was started with, or pass --overwrite") from None
    return ck


def finish_run(run_dir: str | Path | None) -> None:
    """Remove the resume checkpoint once the stage's final files are written."""
    if run_dir is not None and is_main_process():
        p = Path(run_dir) / runs.CKPT
        if p.exists():
            p.unlink()
