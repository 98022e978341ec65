"""``scope="adaptive"``: per-group ratios chosen from each group's measured damage to the model's output.

Global ranking compares scores across layers, which only works when the criterion's scores are in the same units
everywhere; a uniform (local) ratio ignores that some layers matter more than others. ``adaptive`` measures it
instead, in the spirit of sensitivity-driven allocation (Distiller, NNI's sensitivity pruner, OWL for LLMs):

1. the dense model's outputs on the calibration batches are the reference;
2. every group alone is pruned on a copy at a few ratios (``ratio`` x 0.5 / 1 / 1.5, capped at ``max_ratio``) with
   the caller's criterion and compensation (and BatchNorm recalibration, as the final pruning does), and its
   damage is measured: the normalised squared error of the
   output, ``sum ||y - y_dense||^2 / sum ||y_dense||^2`` (padded tokens left out when batches carry an
   ``attention_mask``);
3. the ratios are allocated greedily, a 1% step at a time to the group whose damage grows least per removed
   channel (a power law ``a * r^p`` fitted to each group's measurements), until the channel-weighted mean ratio
   equals ``ratio``.

The damages are treated as additive across groups, which holds for small per-group damage. The cost is
``groups x 3`` pruning calls on copies, so it suits models with tens of groups (transformer MLPs, CNN interiors).

Example:
    >>> report = prunekit.prune(model, example, "variance_conditional", ratio=0.5, scope="adaptive",
    ...                         preset="mlp-only", calib_data=batches, compensate="lstsq")
    >>> report.allocation["bert.encoder.layer.5.intermediate.dense"]["ratio"]
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from prunekit.distributed import all_reduce_mean
from prunekit.errors import ConfigError, PruningError
from prunekit.measure.macs import call_model
from prunekit.pruning.structured.criteria.base import split_batch, to_device
from prunekit.pruning.structured.graph import Unit

log = logging.getLogger(__name__)

TRIAL_FACTORS = (0.5, 1.0, 1.5)  # trial ratios, relative to the target ratio
STEP = 0.01  # allocation step (fraction of a group's channels)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model output is judged by: the tensor itself, or the first tensor of a tuple / dict /
    Hugging Face ``ModelOutput`` (``logits`` or ``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    values = list(output.values()) if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)):
        for v in values:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
    raise PruningError(f"scope='adaptive' compares model outputs, but the model returns {type(output).__name__} "
                       "without a float tensor in it")


class OutputDamage:
    """The dense model's outputs on fixed batches, and the normalised squared error of another model's outputs."""

    def __init__(self, model: nn.Module, batches: list[Any], device: str | torch.device):
        self.batches, self.device = batches, device
        self.reference = [y.detach() for y in self._outputs(model)]
        self.energy = sum(float((y * m).square().sum()) for y, m in zip(self.reference, self._masks()))
        if self.energy <= 0:
            raise PruningError("scope='adaptive': the dense model's outputs are all zero on the calibration batches; "
                               "there is no damage to measure")

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        was_training = model.training
        model.eval()
        try:
            return [output_tensor(call_model(model, to_device(split_batch(b)[0], self.device))).float()
                    for b in self.batches]
        finally:
            model.train(was_training)

    def _masks(self) -> list[torch.Tensor | float]:
        out: list[torch.Tensor | float] = []
        for b, y in zip(self.batches, self.reference):
            x = split_batch(b)[0]
            m = x.get("attention_mask") if isinstance(x, dict) else None
            if m is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(m.shape):
                out.append(m.to(y.device, y.dtype).unsqueeze(-1))
            else:
                out.append(1.0)
        return out

    def __call__(self, model: nn.Module) -> float:
        err = 0.0
        for y, ref, m in zip(self._outputs(model), self.reference, self._masks()):
            if y.shape != ref.shape:
                raise PruningError(f"scope='adaptive': a pruned copy returns shape {tuple(y.shape)}, the dense "
                                   f"model {tuple(ref.shape)}")
            err += float(((y - ref) * m).square().sum())
        return err / self.energy


def damage_curve(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """A smooth, non-decreasing damage curve through measured ``(ratio, damage)`` points, 0 at ratio 0: the power
    law ``a * r^p`` fitted in log space (damage grows smoothly, roughly quadratically, with the ratio), or linear
    interpolation when a point is not positive or the fit is not increasing."""
    pts = sorted(points)
    xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    if len(pts) >= 2 and bool((ys > 0).all()) and bool((xs > 0).all()):
        lx, ly = xs.log(), ys.log()
        p = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).square().sum().clamp_min(1e-12))
        if p > 0:
            a = float((ly - p * lx).mean().exp())
            return lambda r: a * r ** p if r > 0 else 0.0
    lin_x, lin_y = [0.0] + xs.tolist(), [0.0] + ys.cummax(0).values.clamp_min(0).tolist()

    def linear(r: float) -> float:
        for i in range(1, len(lin_x)):
            if r <= lin_x[i] + 1e-12:
                t = (r - lin_x[i - 1]) / max(lin_x[i] - lin_x[i - 1], 1e-12)
                return lin_y[i - 1] + t * (lin_y[i] - lin_y[i - 1])
        return lin_y[-1]

    return linear


def allocate(units: list[Unit], damage: dict[str, list[tuple[float, float]]], ratio: float) -> dict[str, float]:
    """Per-unit ratios whose channel-weighted mean is ``ratio``, greedily minimising the summed damage.

    ``damage[name]`` lists measured ``(ratio, damage)`` points (``damage_curve`` makes a curve of them); no unit
    goes past its largest measured ratio."""
    curves = {u.name: (max(r for r, _ in damage[u.name]), damage_curve(damage[u.name])) for u in units}

    def at(name: str, r: float) -> float:
        return curves[name][1](r)

    sizes = {u.name: u.size for u in units}
    total = sum(sizes.values())
    need = ratio * total
    alloc = {n: 0.0 for n in sizes}
    removed = 0.0
    while removed < need - 1e-9:
        best, best_cost = None, float("inf")
        for n, r in alloc.items():
            top = curves[n][0]
            if r >= top - 1e-12:
                continue
            step = min(STEP, top - r, (need - removed) / sizes[n])
            cost = (at(n, r + step) - at(n, r)) / (step * sizes[n])
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            raise PruningError(f"scope='adaptive': ratio {ratio} cannot be reached within the trial ratios "
                               f"(at most {max(c[0] for c in curves.values()):.2f} per group); lower the ratio "
                               "or raise max_ratio")
        step = min(STEP, curves[best][0] - alloc[best], (need - removed) / sizes[best])
        alloc[best] += step
        removed += step * sizes[best]
    return alloc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The trials' own summaries (one per pruned copy) stay out of the log; warnings still show."""
    logger = logging.getLogger("prunekit.pruning.structured")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def calib_batches(calib_data: Iterable | None, n: int) -> list[Any]:
    """The first ``n`` batches as a list (every trial and the final pruning see the same batches)."""
    if calib_data is None:
        raise ConfigError("scope='adaptive' measures each group's damage to the model's output on calibration data: "
                          "pass calib_data= (a list of batches or a DataLoader)")
    batches = []
    for b in calib_data:
        if len(batches) >= n:
            break
        batches.append(b)
    if not batches:
        raise PruningError("scope='adaptive': calib_data gave no batches")
    return batches


def adaptive_overrides(model: nn.Module, example_inputs: Any, units: list[Unit], settings: Any,
                       calib_data: list[Any], device: str | torch.device,
                       prune_fn: Callable[..., Any], loss_fn: Callable | None = None,
                       ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Unit name -> ratio (see the module docstring), and the measured trials per unit for the report.

    ``prune_fn(model, example_inputs, settings, calib_data=..., loss_fn=..., device=..., units_only=...)`` prunes
    a copy (the engine's ``prune_with_settings``)."""
    if settings.target.macs is not None:
        raise ConfigError("scope='adaptive' allocates a channel ratio; it cannot be combined with target_macs "
                          f"({settings.target.macs}): give --ratio, or use scope global/local with --target-macs")
    ratio = settings.global_ratio
    trial_settings = settings.updated({"scope": "local", "ratio_overrides": {}, "reconstruct_steps": 0,
                                       "reconstruct_augment": 0, "reconstruct_input_mix": 0.0,
                                       "reconstruct_train": "pruned"})
    damage_of = OutputDamage(model, calib_data, device)
    damage: dict[str, list[tuple[float, float]]] = {}
    t0 = time.perf_counter()
    left_whole: list[str] = []
    for i, u in enumerate(units):
        cap = min(settings.layers.max_ratio, u.max_ratio if u.max_ratio is not None else 1.0)
        trials = sorted({round(min(f * ratio, cap), 4) for f in TRIAL_FACTORS} - {0.0})
        damage[u.name] = []
        for r in trials:
            trial = copy.deepcopy(model)
            s = trial_settings.updated({"ratio": r})
            try:
                with _quiet():
                    prune_fn(trial, example_inputs, s, calib_data=calib_data, loss_fn=loss_fn, device=device,
                             units_only={u.name})
            except PruningError as e:  # e.g. rounding leaves nothing to remove at this ratio
                log.warning("scope='adaptive': %s is left whole: pruning it alone at ratio %.2f failed: %s",
                            u.name, r, e)
                left_whole.append(u.name)
                break
            damage[u.name].append((r, damage_of(trial)))
            del trial
        if u.name in left_whole:
            del damage[u.name]
            continue
        log.info("adaptive %d/%d %s: damage %s (%.0f s)", i + 1, len(units), u.name,
                 ", ".join(f"{d:.2e} at {r:.2f}" for r, d in damage[u.name]), time.perf_counter() - t0)
    # torchrun: each rank measured on its own batches; allocate from the average, identically on every rank
    merged = all_reduce_mean({n: torch.tensor([d for _, d in pts], dtype=torch.float64) for n, pts in damage.items()})
    damage = {n: [(r, float(v)) for (r, _), v in zip(pts, merged[n])] for n, pts in damage.items()}
    alloc = allocate([u for u in units if u.name in damage], damage, ratio)
    info = {n: {"ratio": round(alloc[n], 4), "trials": [[r, d] for r, d in damage[n]]} for n in alloc}
    zero = [n for n, r in alloc.items() if r <= 0]
    if zero:
        log.warning("scope='adaptive' leaves %d groups unpruned (their damage per channel is the highest): %s",
                    len(zero), ", ".join(zero[:8]) + (" ..." if len(zero) > 8 else ""))
    return {n: r for n, r in alloc.items() if r > 0}, info
