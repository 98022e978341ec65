"""One size target for a decoder LM: ``target_params`` solved across MLP width, heads, hidden size and depth.

Minitron's small architecture search (arXiv 2407.14679), for small models: a few candidate *shapes*, each a way of
spending the parameter cut, with one free ratio ``r``:

- ``mlp``: MLP channels only (``mlp_ratio = r``);
- ``mlp+hidden``: MLP and the residual stream (``mlp_ratio = r``, ``hidden_ratio = r / 2``);
- ``depth+mlp``: whole decoder layers (about half the cut, at least one layer), the rest from the MLP;
- ``mlp+kv``: key-value heads merged to about half (every query head kept), the rest from the MLP;
- ``mlp+heads``: a quarter of the GQA groups removed, the rest from the MLP (not in the default set: group removal
  costs quality, issue 29);
- ``balanced``: MLP ``r``, hidden ``r / 2`` and the key-value heads merged to about half.

Each shape's ``r`` is solved by bisection on the parameter count, computed exactly from the config and the widths
the pruning would keep (:func:`shape_params`: whole channels, heads and layers, the same rounding as
``prune_width``), so that the count meets the target within ``tolerance``. Each feasible candidate is then pruned
**on a deepcopy of the model, one at a time** (memory: the model, one copy and the transaction's snapshot; small
models are the scope) with the first part of the calibration windows and scored by the mean next-token loss on the
held-out rest (never on evaluation text). The lowest loss wins and is applied to ``model`` itself (depth first, then
width), all or nothing.

Example:
    >>> report = prune_to_params(model, calib_ids, 0.7)          # keep 70 % of the parameters
    >>> [(c["name"], c["params"], c["calib_loss"]) for c in report["candidates"]]
    >>> report["chosen"]                                          # e.g. "mlp+hidden"
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from prunekit.config import Config
from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.transaction import transactional

from .arch import get_family, head_layout
from .depth import DepthConfig, _forward, prune_depth
from .stats import calibration_batches
from .width import WidthSettings, kept_count, prune_width, unwrap

log = logging.getLogger(__name__)
RATIO_KEYS = ("mlp_ratio", "head_ratio", "kv_ratio", "hidden_ratio")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Where the cut goes: the width ratios of ``WidthSettings`` and the number of decoder layers removed."""

    mlp_ratio: float = 0.0
    head_ratio: float = 0.0
    kv_ratio: float = 0.0
    hidden_ratio: float = 0.0
    drop_layers: int = 0

    def width(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in RATIO_KEYS}


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the count needs of the dense model: its config and which projections carry a bias."""

    config: Any
    bias: dict[str, bool]
    tied: bool
    round_to: int


# shape name -> (model, free ratio r) -> Shape, or a reason why the model cannot take it
ShapeFn = Callable[[_Model, float], "Shape | str"]


def _half_kv(m: _Model) -> float | str:
    """``kv_ratio`` that merges the key-value heads to the divisor of the count nearest half (exact, no rounding)."""
    nq, nkv, _ = head_layout(m.config)
    ok = [k for k in range(1, nkv) if nkv % k == 0 and nq % k == 0]
    if not ok:
        return f"{nkv} key-value head(s): none can be merged away"
    return 1 - min(ok, key=lambda k: (abs(k - nkv / 2), -k)) / nkv


def _quarter_groups(m: _Model) -> float | str:
    nkv = head_layout(m.config)[1]
    if nkv < 2:
        return "one key-value group: none can be removed"
    return max(1, round(nkv / 4)) / nkv


def _with(fixed: Callable[[_Model], float | str], key: str, hidden: float = 0.0) -> ShapeFn:
    def fn(m: _Model, r: float) -> Shape | str:
        v = fixed(m)
        return v if isinstance(v, str) else Shape(mlp_ratio=r, hidden_ratio=hidden * r, **{key: v})
    return fn


SHAPES: dict[str, ShapeFn] = {
    "mlp": lambda m, r: Shape(mlp_ratio=r),
    "mlp+hidden": lambda m, r: Shape(mlp_ratio=r, hidden_ratio=r / 2),
    "depth+mlp": lambda m, r: Shape(mlp_ratio=r),  # its layer count is chosen by _depth_drop
    "mlp+kv": _with(_half_kv, "kv_ratio"),
    "mlp+heads": _with(_quarter_groups, "head_ratio"),
    "balanced": _with(_half_kv, "kv_ratio", hidden=0.5),
}
DEFAULT_SHAPES = ("mlp", "mlp+hidden", "depth+mlp", "mlp+kv", "balanced")


class TargetConfig(Config):
    """One size target for ``prune-llm`` (YAML keys = field names; flags ``--target-params`` ...)."""

    target_params: float | None = Field(None, gt=0, description="parameters kept: a fraction in (0, 1) of the "
                                        "current count, or an absolute count > 1; solved across MLP width, heads, "
                                        "hidden size and depth (Minitron-style search; no explicit ratio with it)")
    target_shapes: list[str] = Field(list(DEFAULT_SHAPES), description="candidate shapes, comma-separated: "
                                     + ", ".join(SHAPES))
    target_tolerance: float = Field(0.01, gt=0, lt=0.5, description="relative distance to the target accepted")
    target_holdout: float = Field(0.25, gt=0, lt=1, description="fraction of the calibration windows held out to "
                                  "score the candidates (the rest gives the pruning statistics)")

    @field_validator("target_shapes", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        names = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
        bad = [s for s in names if s not in SHAPES]
        if bad or not names:
            raise ValueError(f"target_shapes {bad or names}: valid: {', '.join(SHAPES)}")
        return names

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`prune_to_params` besides the target."""
        return {"shapes": self.target_shapes, "tolerance": self.target_tolerance, "holdout": self.target_holdout}

    def refuse_explicit(self, width: WidthSettings, depth: DepthConfig) -> None:
        """``target_params`` solves the ratios itself: an explicit one beside it is refused, naming both."""
        if self.target_params is None:
            return
        given = {**{k: getattr(width, k) for k in RATIO_KEYS}, "drop_layers": depth.drop_layers,
                 "layers_ratio": depth.layers_ratio}
        for k, v in given.items():
            if v:
                raise ConfigError(f"--target-params {self.target_params} and --{k.replace('_', '-')} {v}: give one "
                                  "of them (the target solves every ratio and the layer count itself)")


def _dense(lm: nn.Module, round_to: int) -> _Model:
    fam = get_family(lm)
    if fam.attn is None:
        raise ConfigError(f"target_params: model_type {lm.config.model_type!r} is not supported by the size "
                          "search; supported: llama, mistral, qwen2")
    b = fam.blocks(lm)[0]
    mods = dict(lm.named_modules())
    names = {**b.attn, "gate": b.producers[0], "up": b.producers[1], "down": b.consumer}
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    return _Model(copy.deepcopy(lm.config), {k: mods[n].bias is not None for k, n in names.items()},
                  head is None or head.weight is emb.weight, round_to)


def shape_params(m: _Model, s: Shape) -> int:
    """Parameter count of the model ``s`` would leave, from the config and the kept widths (no pruning)."""
    c, b = m.config, m.bias
    nq, nkv, hd = head_layout(c)
    h = kept_count(c.hidden_size, s.hidden_ratio) if s.hidden_ratio > 0 else c.hidden_size
    inter = kept_count(c.intermediate_size, s.mlp_ratio, m.round_to) if s.mlp_ratio > 0 else c.intermediate_size
    if s.head_ratio > 0:
        g = kept_count(nkv, s.head_ratio)
        nq, nkv = g * (nq // nkv), g
    elif s.kv_ratio > 0:
        nkv = round(nkv * (1 - s.kv_ratio))
    q, kv = nq * hd, nkv * hd
    attn = h * q + 2 * h * kv + q * h + b["q"] * q + (b["k"] + b["v"]) * kv + b["o"] * h
    mlp = 3 * h * inter + (b["gate"] + b["up"]) * inter + b["down"] * h
    layers = c.num_hidden_layers - s.drop_layers
    return layers * (attn + mlp + 2 * h) + c.vocab_size * h * (1 if m.tied else 2) + h


def _depth_drop(m: _Model, target: int) -> int | str:
    """Layers removed by ``depth+mlp``: about half the cut, at least one, leaving room for the MLP."""
    full = shape_params(m, Shape())
    per_layer = full - shape_params(m, Shape(drop_layers=1))
    d = max(1, int((full - target) / 2 // per_layer))
    while d > 0 and shape_params(m, Shape(drop_layers=d)) <= target:
        d -= 1
    return d if d > 0 else f"one decoder layer ({per_layer} params) already cuts below the target"


def solve(m: _Model, name: str, target: int, tolerance: float) -> tuple[Shape | None, int, str]:
    """The shape ``name`` with its free ratio solved to meet ``target``: (shape or None, params, why not)."""
    drop = _depth_drop(m, target) if name == "depth+mlp" else 0
    if isinstance(drop, str):
        return None, 0, drop

    def at(r: float) -> Shape | str:
        s = SHAPES[name](m, r)
        return s if isinstance(s, str) else dataclasses.replace(s, drop_layers=drop)

    lo, hi = 0.0, 0.95  # count(lo) > target >= count(hi), count non-increasing in r
    first = at(lo)
    if isinstance(first, str):
        return None, 0, first
    if shape_params(m, first) <= target:
        return None, 0, f"its fixed part alone leaves {shape_params(m, first)} params, below the target"
    if shape_params(m, at(hi)) > target:
        return None, 0, f"even r={hi} leaves {shape_params(m, at(hi))} params"
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shape_params(m, at(mid)) > target else (lo, mid)
    best = min((_exact(m, at(hi)), _exact(m, at(lo))), key=lambda s: abs(shape_params(m, s) - target))
    n = shape_params(m, best)
    if best == Shape():
        return None, n, "the target is within one unit of the dense model: nothing to prune"
    if abs(n - target) > tolerance * target:
        return None, n, f"the nearest count {n} misses the target {target} by more than {tolerance:.1%}"
    return best, n, ""


def _exact(m: _Model, s: Shape) -> Shape:
    """The same widths with exact ratios (``1 - kept / total``; 0 where nothing goes), as the report shows them."""
    c = m.config
    mlp = kept_count(c.intermediate_size, s.mlp_ratio, m.round_to) if s.mlp_ratio > 0 else c.intermediate_size
    hid = kept_count(c.hidden_size, s.hidden_ratio) if s.hidden_ratio > 0 else c.hidden_size
    return dataclasses.replace(s, mlp_ratio=1 - mlp / c.intermediate_size, hidden_ratio=1 - hid / c.hidden_size)


def target_count(target: float, params: int) -> int:
    """The target as a parameter count: a fraction in (0, 1) of ``params``, or a count in (1, params)."""
    if not 0 < target < 1 and not 1 < target < params:
        raise ConfigError(f"target_params={target}: give a fraction in (0, 1) of the current {params} parameters "
                          f"or a count between 1 and {params}")
    return int(round(target * params)) if target < 1 else int(round(target))


def apply_shape(model: nn.Module, shape: Shape, calib: list[torch.Tensor], width: WidthSettings,
                depth: DepthConfig, atomic: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place to ``shape``: depth first (layer scores on the dense model), then width."""
    report: dict[str, Any] = {}
    if shape.drop_layers:
        report["depth"] = prune_depth(model, calib, depth, drop_layers=shape.drop_layers, layers_ratio=0.0,
                                      atomic=atomic)
    if any(shape.width().values()):
        report["width"] = prune_width(model, calib, width, **shape.width(), atomic=atomic)
    return report


@torch.no_grad()
def calib_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token loss of ``model`` on ``batches`` (eval mode)."""
    lm = unwrap(model)
    was = lm.training
    lm.eval()
    try:
        return _forward(lm, batches, loss=True)
    finally:
        lm.train(was)


def _split(calib: torch.Tensor | list[torch.Tensor], holdout: float, batch_size: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration windows for the pruning statistics and the held-out ones that score the candidates."""
    windows = torch.cat(calibration_batches(calib, batch_size))  # (N, T)
    n_held = max(1, int(round(holdout * len(windows))))
    if len(windows) - n_held < 1:
        raise ConfigError(f"target_params: {len(windows)} calibration window(s) cannot be split into pruning and "
                          f"held-out windows (target_holdout={holdout}); give at least 2 windows")
    return list(windows[:-n_held].split(batch_size)), list(windows[-n_held:].split(batch_size))


def _candidate(model: nn.Module, name: str, shape: Shape, n: int, fit: list[torch.Tensor], held: list[torch.Tensor],
               width: WidthSettings, depth: DepthConfig) -> dict[str, Any]:
    """Prune a deepcopy of ``model`` to ``shape``, score it on ``held``, let the copy go."""
    trial = copy.deepcopy(unwrap(model))
    apply_shape(trial, shape, fit, width, depth)
    loss = calib_loss(trial, held)
    real = sum(p.numel() for p in trial.parameters())
    if real != n:
        raise PruningError(f"target_params: candidate {name!r} has {real} parameters, the count from its config "
                           f"said {n}; this model's layout is not what the size search assumes")
    widths = _widths(unwrap(model).config, trial.config)
    del trial
    log.info("candidate %-10s params %d  calibration loss %.4f  %s", name, n, loss, widths)
    return {"name": name, "shape": dataclasses.asdict(shape), "params": n, "calib_loss": loss,
            "widths": widths}


WIDTH_FIELDS = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "hidden_size")


def _widths(before: Any, after: Any) -> dict[str, list[int]]:
    """The config widths a candidate changed, ``key -> [before, after]``."""
    return {k: [getattr(before, k), getattr(after, k)] for k in WIDTH_FIELDS if getattr(before, k) != getattr(after, k)}


@transactional("prune_to_params()")
def prune_to_params(model: nn.Module, calib: torch.Tensor | list[torch.Tensor], target: float, *,
                    width: WidthSettings | None = None, depth: DepthConfig | None = None,
                    shapes: tuple[str, ...] | list[str] = DEFAULT_SHAPES, tolerance: float = 0.01,
                    holdout: float = 0.25, batch_size: int = 8) -> dict[str, Any]:
    """Prune ``model`` in place to ``target`` parameters by the best of a few candidate shapes (see the module).

    Candidates are pruned one at a time on a deepcopy, then the winner is pruned on ``model`` itself; a failure
    leaves ``model`` as it was. Memory: the model, one candidate copy and the transaction's snapshot of the model
    (``atomic=False`` skips the snapshot): small models are the scope.

    Args:
        model: LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (or ``hf:`` wrapper).
        calib: calibration token ids, ``(N, T)`` or a list of ``(B, T)`` batches (training text, never test text).
        target: parameters kept: a fraction in (0, 1) of the current count, or an absolute count > 1.
        width: criterion, compensation, ``round_to``... of the width pruning (its ratios are ignored).
        depth: the layer-importance criterion of the ``depth+mlp`` shape.
        shapes: candidate shape names (:data:`SHAPES`).
        tolerance: relative distance to the target count accepted.
        holdout: fraction of the calibration windows held out to score the candidates.

    Returns:
        A report: target, params before/after, every candidate (shape, widths, params, calibration loss, or why it
        was skipped), the chosen one and the depth / width reports of the final pruning.

    Raises:
        ConfigError: a bad target or shape name; no candidate meets the target.
    """
    width = (width or WidthSettings()).updated({k: 0.0 for k in RATIO_KEYS}, source="prune_to_params")
    depth = depth or DepthConfig()
    lm = unwrap(model)
    m = _dense(lm, width.round_to)
    before = sum(p.numel() for p in lm.parameters())
    if shape_params(m, Shape()) != before:
        raise PruningError(f"target_params: the config describes {shape_params(m, Shape())} parameters, the model "
                           f"has {before}; this layout is not supported by the size search")
    goal = target_count(target, before)
    fit, held = _split(calib, holdout, batch_size)
    rows: list[dict[str, Any]] = []
    for name in shapes:
        if name not in SHAPES:
            raise ConfigError(f"target_shapes: unknown shape {name!r}; valid: {', '.join(SHAPES)}")
        shape, n, why = solve(m, name, goal, tolerance)
        rows.append(_candidate(model, name, shape, n, fit, held, width, depth) if shape is not None
                    else {"name": name, "skipped": why})
        if shape is None:
            log.info("candidate %-10s skipped: %s", name, why)
    scored = [r for r in rows if "calib_loss" in r]
    if not scored:
        raise ConfigError(f"target_params={target}: no candidate shape meets {goal} parameters within "
                          f"{tolerance:.1%}: " + "; ".join(f"{r['name']}: {r['skipped']}" for r in rows))
    best = min(scored, key=lambda r: (r["calib_loss"], r["params"]))
    dense_loss = calib_loss(model, held)
    log.info("size target %d params: kept %s (%d params, calibration loss %.4f; dense %.4f)", goal, best["name"],
             best["params"], best["calib_loss"], dense_loss)
    final = apply_shape(model, Shape(**best["shape"]), fit, width, depth, atomic=True)
    after = sum(p.numel() for p in lm.parameters())
    return {"target_params": target, "target_count": goal, "tolerance": tolerance, "params_before": before,
            "params_after": after, "dense_calib_loss": dense_loss, "holdout_windows": sum(len(b) for b in held),
            "candidates": [r | {"chosen": r is best} for r in rows], "chosen": best["name"],
            "calib_loss": calib_loss(model, held), **final}
