"""Training settings shared by ``train``, ``finetune`` and the fine-tuning phases of recipes."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from prunekit.config import Config
from prunekit.errors import ConfigError


def check_device(v: str) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto'; CUDA asked for without CUDA is a ConfigError."""
    if v == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if v == "cpu":
        return v
    if v == "cuda" or v.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {v}: CUDA is not available on this machine (torch {torch.__version__}, "
                              f"cuda build {torch.version.cuda}); use --device cpu")
        return v
    raise ConfigError(f"--device {v!r} is not valid; choose from cpu, cuda, cuda:N, auto")


class TrainSettings(Config):
    epochs: int = Field(10, ge=0, description="training epochs")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="final learning rate of the cosine schedule")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs (stepped per batch)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    amp: bool = Field(False, description="mixed precision (CUDA only; ignored with a warning on CPU)")
    patience: int | None = Field(None, gt=0, description="early stopping: epochs without a better top-1")
    ema: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights with this decay")
    seed: int = Field(0, description="random seed")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    tensorboard: bool = Field(False, description="also write the history's scalars (loss, top-1, lr, retention...) "
                                                 "as TensorBoard event files in RUN_DIR/tensorboard (needs the "
                                                 "tensorboard extra)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)
