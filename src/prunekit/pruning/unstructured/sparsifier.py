"""``Sparsifier``: the lifecycle of unstructured pruning, shaped like ``torch.optim`` (torchao style).

    sp = Sparsifier(model, settings, example_inputs, calib_data)   # choose the layers
    sp.step(0.5)                                                    # score, build masks, attach them
    fit(model, ..., callbacks=[sp])                                 # masks stay fixed while training
    report = sp.report(); sp.finalize(permanent=False)              # figures; record masks for save_model

``sparsify(model, "l1", 0.5)`` does the one-shot case in one call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.pruning.transaction import transactional
from prunekit.pruning.unstructured import patterns as P
from prunekit.pruning.unstructured.layers import LayerSelection, gemm_weight, select_layers
from prunekit.pruning.unstructured.masks import (
    apply_masks,
    fold_masks,
    get_mask,
    mask_gradients,
    record_in_spec,
    set_mask,
)
from prunekit.pruning.unstructured.methods import Method, Movement, Taylor, get_method
from prunekit.pruning.unstructured.settings import SparsifySettings

log = logging.getLogger(__name__)


def _default_inputs(model: nn.Module, example_inputs: Any) -> Any:
    if example_inputs is not None or getattr(model, "prunekit_spec", None) is None:
        return example_inputs
    from prunekit.runs import example_inputs as make_inputs

    p = next(model.parameters(), None)
    return make_inputs(model.prunekit_spec, 1, p.device if p is not None else "cpu")


class Sparsifier:
    """Masks a model's convolution / linear weights by one registered method.

    Args:
        model: the model, changed in place (masks are buffers on its layers, see ``masks.py``).
        settings: a ``SparsifySettings``; or give its fields as keyword arguments instead.
        example_inputs: inputs for one forward pass: finds the first layer and the classifier (left dense by
            default) and the MACs of each layer. Default: from ``model.prunekit_spec`` when there is one.
        calib_data: labelled batches for ``taylor`` (``calib_batches`` of them are used at every step).
        loss_fn: ``loss_fn(outputs, labels)`` for ``taylor`` (default cross-entropy).
        device: where calibration batches go (default: the model's device).

    Example:
        >>> sp = Sparsifier(model, method="nm", nm="2:4", example_inputs=torch.randn(1, 3, 32, 32))
        >>> sp.step()
        >>> sp.report().sparsity
        0.5
    """

    def __init__(self, model: nn.Module, settings: SparsifySettings | None = None, example_inputs: Any = None,
                 calib_data: Iterable | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                 device: str | torch.device | None = None, **options: Any):
        if settings is None:
            settings = SparsifySettings.build(options, source="sparsify")
        elif options:
            raise ConfigError(f"sparsify: give either settings or keyword options ({', '.join(options)}), not both")
        self.model, self.settings = model, settings
        self.method: Method = get_method(settings.method)(seed=settings.seed)
        self.example_inputs = _default_inputs(model, example_inputs)
        self.calib_data, self.loss_fn = calib_data, loss_fn
        p = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (p.device if p is not None else "cpu")
        if self.method.layerwise:  # the method knows which layers it prunes (decoder LMs: inside the blocks)
            self.selection: LayerSelection = self.method.select(model, settings.only, settings.ignore,
                                                                self.example_inputs)
        else:
            self.selection = select_layers(model, settings.only, settings.ignore, settings.dense_first_last,
                                           self.example_inputs)
        self.padded: list[str] = []
        self.layers = self._eligible(self.selection)
        self.patterns: dict[str, P.PatternChoice] = {}
        self.current: float | None = None  # the sparsity asked for at the last step
        self.steps = 0
        log.info("sparsify: method %s on %d layers (%d left dense: %s)", settings.method, len(self.layers),
                 len(self.selection.skipped), ", ".join(self.selection.skipped) or "none")

    # ------------------------------------------------------------------------------------------ layers
    def _eligible(self, sel: LayerSelection) -> dict[str, nn.Module]:
        s, structure = self.settings, self.settings.structure
        layers: dict[str, nn.Module] = {}
        for name, m in sel.layers.items():
            w = gemm_weight(m)  # (out, in), also for a transposed GPT-2 Conv1D
            why = None
            if structure == "nm":
                n, mm = s.nm_pair
                if not P.nm_fits(w.shape, mm):
                    if s.nm_fallback == "pad":
                        self.padded.append(name)
                    else:
                        why = (f"input size {w.shape[1]} is not a multiple of {mm}: left dense (--nm-fallback dense; "
                               "--nm-fallback pad would zero-pad it)")
            elif structure in ("kernel", "pattern") and w.dim() < 3:
                why = f"not a convolution ({type(m).__name__}): {s.method} pruning acts on conv kernels"
            elif structure == "pattern":
                positions = w[0, 0].numel()
                if not s.pattern_keep < positions <= 62:
                    why = f"kernel has {positions} positions; intra-kernel keeps {s.pattern_keep} of more than that"
            if why:
                sel.skipped[name] = why
            else:
                layers[name] = m
        left = [n for n, why in sel.skipped.items() if "multiple of" in why]
        if left:
            log.warning("sparsify %s: %d layers left dense because their input size is not a multiple of %d: %s",
                        s.nm, len(left), s.nm_pair[1], ", ".join(left))
        if self.padded:
            log.info("sparsify %s: %d layers zero-padded along the input dimension: %s", s.nm, len(self.padded),
                     ", ".join(self.padded))
        if not layers:
            raise PruningError(f"method {s.method!r} found no layer it can prune: "
                               + "; ".join(f"{n}: {w}" for n, w in list(sel.skipped.items())[:8]))
        return layers

    # ------------------------------------------------------------------------------------------ step
    def _element_scores(self) -> dict[str, torch.Tensor]:
        if isinstance(self.method, Taylor):
            if self.calib_data is None:
                raise PruningError("method 'taylor' needs calibration data: pass calib_data (labelled batches)")
            return self.method.calibrate(self.model, self.layers, self.calib_data, self.settings.calib_batches,
                                         self.loss_fn, self.device)
        return self.method.score(self.layers)

    @torch.no_grad()
    def step(self, sparsity: float | None = None) -> dict[str, float]:
        """Score the weights and (re)build the masks at ``sparsity`` (default: the settings' target).

        Masks only grow: a weight pruned at an earlier step stays pruned. Returns the sparsity of each layer.
        """
        s, structure = self.settings, self.settings.structure
        target = s.target() if sparsity is None else float(sparsity)
        if not 0 <= target < 1:
            raise PruningError(f"sparsity {target} must be in [0, 1)")
        if structure in ("nm", "pattern") and abs(target - s.fixed()) > 1e-9:
            raise PruningError(f"method {s.method!r} has a fixed sparsity ({s.fixed():.4g}); step() takes none")
        old = {n: get_mask(m) for n, m in self.layers.items()}
        if self.method.layerwise:
            if any(o is not None for o in old.values()):
                raise PruningError(f"method {s.method!r} prunes dense layers in one step (one-shot): the model is "
                                   "already sparsified; start from the dense model")
            masks = self.method.prune(self.model, self.layers, target, s.nm_pair if structure == "nm" else None,
                                      self.calib_data, s.calib_batches, self.device)
        elif structure == "element":
            with torch.enable_grad():
                scores = self._element_scores()
            scores = {n: self._hide_pruned(sc, old[n]) for n, sc in scores.items()}
            masks = (P.global_masks if s.resolved_scope == "global" else P.layer_masks)(scores, target)
        elif structure == "nm":
            n_keep, m = s.nm_pair
            masks = {n: P.nm_mask(self._hide_pruned(mod.weight.abs(), old[n]), n_keep, m, pad=n in self.padded)
                     for n, mod in self.layers.items()}
        elif structure == "kernel":
            masks = {}
            for n, mod in self.layers.items():
                ks = P.kernel_scores(mod.weight)
                if old[n] is not None:  # a kernel with every position pruned stays pruned
                    ks = ks.masked_fill(~old[n].flatten(2).any(-1), float("-inf"))
                kmask = P.prune_lowest(ks, round(target * ks.numel()))
                masks[n] = P.expand_kernel_mask(kmask, mod.weight.shape)
        else:  # pattern
            masks = {}
            for n, mod in self.layers.items():
                masks[n], self.patterns[n] = P.pattern_mask(mod.weight, s.pattern_keep, s.patterns, old[n])
        for n, mod in self.layers.items():
            mask = masks[n].to(mod.weight.device)
            set_mask(mod, mask if old[n] is None else mask & old[n], n)
        self.current, self.steps = target, self.steps + 1
        achieved = self.layer_sparsity()
        if target == 0:
            log.warning("sparsify: sparsity 0 asked for: no weight was pruned")
        dead = [n for n, v in achieved.items() if v >= 0.999]
        if dead:
            log.warning("sparsify: %d layers are (almost) entirely zero, which cuts the network there: %s; lower "
                        "the sparsity, use scope 'layer', or --ignore them", len(dead), ", ".join(dead))
        log.info("sparsify step %d: %s %.4f -> %.4f of the selected weights are zero", self.steps, s.method, target,
                 self.sparsity())
        return achieved

    @staticmethod
    def _hide_pruned(scores: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        scores = scores.detach().float()
        return scores if old is None else scores.masked_fill(~old.to(scores.device), float("-inf"))

    # ------------------------------------------------------------------------------------------ figures
    @torch.no_grad()
    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights in each selected layer."""
        return {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in self.layers.items()}

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of exactly-zero weights over all selected layers."""
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        return zeros / sum(m.weight.numel() for m in self.layers.values())

    def report(self, example_inputs: Any = None) -> Any:
        """A ``SparsityReport``: per-layer and global sparsity, non-zero parameters, storage, MACs (honestly)."""
        from prunekit.pruning.unstructured.report import build_report

        return build_report(self, example_inputs if example_inputs is not None else self.example_inputs)

    # ------------------------------------------------------------------------------------------ training
    def on_before_optimizer_step(self, model: nn.Module, step: int) -> None:
        if isinstance(self.method, Movement):
            self.method.accumulate(self.layers)
        mask_gradients(self.model)

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        apply_masks(self.model)

    # ------------------------------------------------------------------------------------------ finish
    def info(self) -> dict[str, Any]:
        """What a run directory records about this sparsification (``model.json`` extra["sparsity"])."""
        s = self.settings
        out: dict[str, Any] = {"method": s.method, "structure": s.structure, "sparsity": self.current,
                               "scope": s.resolved_scope if s.structure == "element" else None}
        if s.structure == "nm":
            out.update(nm=s.nm, nm_fallback=s.nm_fallback, padded=list(self.padded))
        if s.structure == "pattern":
            out.update(pattern_keep=s.pattern_keep, patterns={n: c.codes for n, c in self.patterns.items()})
        return out

    def finalize(self, permanent: bool = False) -> None:
        """Record the masks in ``model.prunekit_spec`` (when the model has one) so ``save_model`` keeps them; with
        ``permanent`` fold them into the weights (same outputs, no buffers, no hooks)."""
        if permanent:
            fold_masks(self.model)
        if getattr(self.model, "prunekit_spec", None) is not None:
            record_in_spec(self.model, self.info())


@transactional("sparsify()")
def sparsify(model: nn.Module, method: str = "l1", sparsity: float | None = None, *, example_inputs: Any = None,
             calib_data: Iterable | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
             device: str | torch.device | None = None, permanent: bool = False, **options: Any) -> Any:
    """One-shot unstructured pruning of ``model`` in place; returns a ``SparsityReport``.

    ``options`` are the other ``SparsifySettings`` fields (nm, nm_fallback, scope, pattern_keep, patterns, only,
    ignore, dense_first_last, calib_batches, seed). ``movement`` needs a training phase: use ``Sparsifier`` with
    ``GradualSchedule`` (or ``prunekit sparsify --schedule gradual``).

    Example:
        >>> report = sparsify(model, "global", 0.8, example_inputs=torch.randn(1, 3, 32, 32))
        >>> report = sparsify(model, "nm", nm="2:4")
    """
    settings = SparsifySettings.build({"method": method, "sparsity": sparsity, **options}, source="sparsify")
    if get_method(method).needs == "training":
        raise ConfigError(f"method {method!r} scores weights during training, so it cannot prune one-shot: use "
                          "Sparsifier + GradualSchedule with a training loop (CLI: --schedule gradual --epochs N)")
    sp = Sparsifier(model, settings, example_inputs, calib_data, loss_fn, device)
    sp.step()
    report = sp.report()
    sp.finalize(permanent)
    return report
