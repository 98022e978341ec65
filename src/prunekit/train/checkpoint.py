"""The resume checkpoint of a training stage: its settings fingerprint, the checked load, its removal at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit import runs
from prunekit.train.distributed import rank

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
    if run_dir is not None and rank() == 0:
        p = Path(run_dir) / runs.CKPT
        if p.exists():
            p.unlink()
