"""Knowledge distillation: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on softened logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.measure.macs import call_model
from prunekit.train.loop import LossFn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al. 2015. ``alpha`` weighs the hard-label cross-entropy; the KL term is scaled by T^2."""
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * (t * t) * kl


def make_kd_loss(teacher: nn.Module, alpha: float, temperature: float, label_smoothing: float = 0.0) -> LossFn:
    """A ``fit`` loss function that runs the frozen ``teacher`` on the same (augmented) inputs as the student."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(out: torch.Tensor, y: torch.Tensor, x: Any) -> torch.Tensor:
        with torch.no_grad():
            t_out = call_model(teacher, x).float()
        return kd_loss(out.float(), t_out, y, alpha, temperature, label_smoothing)

    return loss_fn
