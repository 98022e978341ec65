"""Short KD recovery of a pruned causal LM: logit distillation from the dense model, resumable.

Each step draws ``kd_batch`` random windows of ``seq_len`` tokens from a token stream (seeded by the step number,
so a resumed run draws the same windows), runs the frozen teacher and the student, and minimises the mean per-token
``KL(teacher || student)`` at temperature 1 (plus ``kd_ce`` times the next-token cross-entropy). AdamW, a linear
warm-up over the first 5 % of the steps then a cosine decay to zero, gradients clipped at 1. A log line every
``kd_log_every`` steps gives the loss, the KL, the learning rate and the time left.

Checkpoints (every ``kd_every`` steps, in ``ckpt_dir``): ``stepNNNNNNN.safetensors`` (the student's weights),
``stepNNNNNNN.optim.pt`` (the optimizer state, ``torch.save``; read back with ``weights_only=True`` only) and then
``state.json`` (the step, the settings fingerprint, the caller's ``meta``), each written atomically: ``state.json``
names a step only once both files of that step are complete, and older steps are removed after. A call that finds
``state.json`` continues from its step and ends with the same weights as a run that never stopped.

Example:
    >>> res = lm_distill(student, teacher, train_ids, LMKDConfig(kd_steps=100), seq_len=256, ckpt_dir="out/kd")
    >>> res["kd_loss_last"]
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from prunekit._io import atomic_write, atomic_write_json
from prunekit.config import Config
from prunekit.errors import ConfigError, RunDirError

log = logging.getLogger("prunekit.kd")
STATE = "state.json"


class LMKDConfig(Config):
    """KD recovery after ``prune-llm`` (YAML keys = field names; flags ``--kd-steps`` ...)."""

    kd_steps: int = Field(0, ge=0, description="steps of logit distillation from the dense model (0: none)")
    kd_lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate (linear warm-up, cosine decay)")
    kd_batch: int = Field(8, gt=0, description="windows of --seq-len tokens per step")
    kd_ce: float = Field(0.0, ge=0, description="weight of the next-token cross-entropy added to the KL")
    kd_every: int = Field(25, gt=0, description="write a resumable checkpoint every this many steps")
    kd_log_every: int = Field(10, gt=0, description="a progress line every this many steps")
    train_text: Path | None = Field(None, description="text for KD windows (default: --calib-text)")


def lr_at(step: int, steps: int, lr: float) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up over 5 % of ``steps``, then cosine to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def windows_at(tokens: torch.Tensor, step: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """The ``(n, seq_len)`` windows of ``step``: a function of the step and seed only (so resuming redraws them)."""
    if len(tokens) <= seq_len:
        raise ConfigError(f"KD text has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (n,), generator=g).tolist()
    return torch.stack([tokens[s:s + seq_len] for s in starts])


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-token KL(teacher || student) at T=1, next-token cross-entropy); logits (B, T, V), ids (B, T)."""
    s = F.log_softmax(student_logits.float().flatten(0, 1), -1)  # (B*T, V)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), -1)
    kl = F.kl_div(s, t, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    return kl, ce


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean per-token KL(teacher || student) on ``windows`` (N, T), both in eval mode."""
    device = next(student.parameters()).device
    total, n = 0.0, 0
    was = student.training
    student.eval()
    for b in windows.split(batch):
        b = b.to(device)
        kl, _ = kd_terms(student(input_ids=b, use_cache=False).logits, teacher(input_ids=b, use_cache=False).logits, b)
        total, n = total + float(kl) * b.numel(), n + b.numel()
    student.train(was)
    return total / max(n, 1)


def _files(d: Path, step: int) -> tuple[Path, Path]:
    return d / f"step{step:07d}.safetensors", d / f"step{step:07d}.optim.pt"


def save_checkpoint(d: Path, step: int, student: nn.Module, opt: torch.optim.Optimizer | None,
                    fingerprint: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write step ``step`` (weights, optimizer, then ``state.json``) atomically; remove older steps."""
    from safetensors.torch import save_model

    d.mkdir(parents=True, exist_ok=True)
    if step > 0 and opt is not None:
        w, o = _files(d, step)
        atomic_write(w, lambda tmp: save_model(student, tmp))  # tied embeddings are stored once
        atomic_write(o, lambda tmp: torch.save(opt.state_dict(), tmp))
    atomic_write_json(d / STATE, {"step": step, "fingerprint": fingerprint, "meta": meta})
    for f in d.glob("step*"):
        if not f.name.startswith(f"step{step:07d}."):
            f.unlink()


def read_state(d: Path) -> dict[str, Any] | None:
    """``state.json`` of a checkpoint folder, or ``None`` when there is none."""
    p = Path(d) / STATE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{str(p)!r} is damaged ({e}); pass --overwrite to start again") from None


def load_checkpoint(d: Path, state: dict[str, Any], student: nn.Module, opt: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> int:
    """Restore the student and optimizer of ``state``'s step (checked against ``fingerprint``); the step."""
    from safetensors.torch import load_model

    if state.get("fingerprint") != fingerprint:
        old, new = state.get("fingerprint") or {}, fingerprint
        diff = "; ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
        raise ConfigError(f"KD resume from {str(d)!r}: the checkpoint was written with other settings ({diff}); "
                          "rerun with the checkpoint's values, or pass --overwrite to start again")
    step = int(state["step"])
    if step == 0:
        return 0
    w, o = _files(d, step)
    try:
        load_model(student, str(w), strict=True)
        opt.load_state_dict(torch.load(o, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a missing or damaged file raises several types
        raise RunDirError(f"KD resume from {str(d)!r}: step {step} cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]}); pass --overwrite to start again") from None
    return step


def _step(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, ce_weight: float
          ) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
    kl, ce = kd_terms(student(input_ids=ids, use_cache=False).logits, t_logits, ids)
    return kl + ce_weight * ce if ce_weight else kl, kl.item()


def lm_distill(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, settings: LMKDConfig, *,
               seq_len: int, seed: int = 0, ckpt_dir: str | Path | None = None, meta: dict[str, Any] | None = None,
               fingerprint: dict[str, Any] | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (in place) for ``settings.kd_steps`` steps; resumes from ``ckpt_dir``.

    Args:
        student: the pruned causal LM (trained in place); teacher: the dense one (frozen).
        tokens: 1-D token ids the windows are drawn from (training or calibration text, never test text).
        settings: :class:`LMKDConfig`.
        seq_len: tokens per window; seed: seed of the window draws.
        ckpt_dir: checkpoint folder (``None``: no checkpoints); meta: JSON the caller keeps in ``state.json``.
        fingerprint: settings a resumed run must share (default: ``settings`` and ``seq_len``, ``seed``).
        stop_after: stop once this many steps are done in total, as a kill would (no checkpoint of its own).

    Returns:
        Steps done, the step resumed from, the first / last logged loss, seconds.
    """
    steps = settings.kd_steps
    if steps <= 0:
        raise ConfigError(f"kd_steps={steps}: nothing to distil; set --kd-steps (e.g. 100)")
    fingerprint = fingerprint or {**settings.to_dict(), "seq_len": seq_len, "seed": seed}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    teacher.eval()  # run under no_grad; its requires_grad flags are left as the caller set them
    params = list(student.parameters())
    for p in params:  # every weight of the student trains, also when it was copied from a frozen model
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.kd_lr, weight_decay=0.01)
    d = Path(ckpt_dir) if ckpt_dir is not None else None
    state = read_state(d) if d is not None else None
    start = load_checkpoint(d, state, student, opt, fingerprint) if state is not None else 0
    meta = state["meta"] if state is not None else (meta or {})
    if d is not None and state is None:
        save_checkpoint(d, 0, student, None, fingerprint, meta)  # marks the folder as a KD run to resume
    return _loop(student, teacher, tokens, settings, seq_len, seed, opt, start, stop_after, d, fingerprint, meta)


def _loop(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, s: LMKDConfig, seq_len: int, seed: int,
          opt: torch.optim.Optimizer, start: int, stop_after: int | None, d: Path | None,
          fingerprint: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    device = next(student.parameters()).device
    end = min(s.kd_steps, stop_after) if stop_after is not None else s.kd_steps
    student.train()
    t0, losses, logged = time.perf_counter(), [], []
    if start:
        log.info("KD: resuming at step %d/%d from %s", start, s.kd_steps, d)
    for step in range(start, end):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.kd_steps, s.kd_lr)
        ids = windows_at(tokens, step, s.kd_batch, seq_len, seed).to(device)
        loss, kl = _step(student, teacher, ids, s.kd_ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % s.kd_log_every == 0 or done == end:
            recent = losses[-s.kd_log_every:]
            logged.append(sum(recent) / len(recent))
            per = (time.perf_counter() - t0) / len(losses)
            log.info("KD step %d/%d  loss %.4f  kl %.4f  lr %.2e  ETA %.0f s", done, s.kd_steps, logged[-1], kl,
                     g["lr"], per * (s.kd_steps - done))
        if d is not None and (done % s.kd_every == 0 or done == s.kd_steps):
            save_checkpoint(d, done, student, opt, fingerprint, meta)
    student.eval()
    return {"kd_steps_done": end, "kd_resumed_from": start, "kd_loss_first": logged[0] if logged else None,
            "kd_loss_last": logged[-1] if logged else None, "kd_seconds": round(time.perf_counter() - t0, 2)}
