"""Unstructured-pruning methods: what is scored (``score``) and what shape the mask takes (``structure``).

=================  ================================================  =============  ==================
method             score                                             structure      needs
=================  ================================================  =============  ==================
``l1``             ``|w|``, each layer to the sparsity               element        weights
``global``         ``|w|``, one threshold across the layers          element        weights
``taylor``         ``sum_b |w * dL_b/dw|`` over calibration batches  element        labelled batches
``movement``       ``-sum_t w * dL_t/dw`` over training steps        element        a training phase
``random``         uniform noise (seeded): the baseline              element        nothing
``nm``             ``|w|``; keep N of every M along the input dim    N:M            weights
``kernel``         L1 norm of each whole kernel ``W[o, i]``          kernel         weights
``intra-kernel``   ``|w|``; k positions per kernel, shared patterns  pattern        weights
``wanda``          ``|w_ij| * ||x_j||_2`` per output row, block by   element or     token batches
                   block through a decoder LM (Sun et al. 2023)      N:M            (decoder LMs)
``sparsegpt``      OBS with weight updates, block by block           element or     token batches
                   (Frantar & Alistarh 2023)                         N:M            (decoder LMs)
=================  ================================================  =============  ==================

``wanda`` and ``sparsegpt`` prune the linear layers inside a decoder-only language model's blocks
(``prunekit.pruning.llm.sparse``): ``--sparsity S`` for unstructured, or no ``--sparsity`` and ``--nm N:M``
(default 2:4) for N:M.

A method is one small class; register a new one with ``@register_method("name")``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruningError
from prunekit.pruning.structured.criteria.base import accumulate_taylor, split_batch, to_device
from prunekit.registry import Registry

METHODS: Registry[type[Method]] = Registry("sparsify method")
STRUCTURES = ("element", "nm", "kernel", "pattern")


def register_method(name: str, **meta: Any):
    """Register a ``Method`` subclass under ``name`` (also set as its ``name``)."""
    inner = METHODS.register(name, **meta)

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return inner(cls)

    return deco


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


class Method:
    """A scoring rule plus a mask structure. ``score`` returns one score per weight (higher = more important)."""

    name: ClassVar[str] = ""
    structure: ClassVar[str] = "element"  # element | nm | kernel | pattern
    scope: ClassVar[str] = "layer"  # default scope of element methods: layer | global
    needs: ClassVar[str] = "weights"  # weights | calibration | training
    nm_capable: ClassVar[bool] = False  # element with --sparsity, N:M (--nm) without: structure set by the settings
    layerwise: ClassVar[bool] = False  # chooses its own layers and builds its masks from the model and data (prune)

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        return {n: m.weight.detach().abs() for n, m in layers.items()}


@register_method("l1", help="magnitude |w|, each layer pruned to the sparsity")
class L1(Method):
    pass


@register_method("global", help="magnitude |w|, one threshold across all selected layers")
class GlobalMagnitude(Method):
    scope = "global"


@register_method("random", help="random scores (seeded): the baseline every method must beat")
class Random(Method):
    """Fixed random scores per layer, drawn once, so iterative steps prune nested sets."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._scores: dict[str, torch.Tensor] = {}

    def score(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        for n, m in layers.items():  # drawn in a fixed layer order: reproducible for a given seed
            if n not in self._scores or self._scores[n].shape != m.weight.shape:
                self._scores[n] = torch.rand(m.weight.shape, generator=g)
        return {n: self._scores[n].to(m.weight.device) for n, m in layers.items()}


@register_method("taylor", help="first-order Taylor |w * grad| accumulated over calibration batches")
class Taylor(Method):
    """``sum_b |w * dL_b/dw|`` over labelled calibration batches, recomputed at every pruning step (model in eval
    mode: BatchNorm running statistics, no dropout)."""

    needs = "calibration"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.batches = 0

    def calibrate(self, model: nn.Module, layers: dict[str, nn.Module], data: Iterable, max_batches: int,
                  loss_fn: Callable[..., torch.Tensor] | None = None,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        batches = ((to_device(x, device), None if y is None else y.to(device))
                   for x, y in map(split_batch, itertools.islice(data, max_batches)))
        acc, self.batches = accumulate_taylor(model, [m.weight for m in layers.values()], batches,
                                              loss_fn or F.cross_entropy, "method 'taylor'")
        return dict(zip(layers, acc))


@register_method("movement", help="movement -w * grad accumulated during training (needs a training phase)")
class Movement(Method):
    """Movement pruning (Sanh et al. 2020): ``S -= w * dL/dw`` after every backward pass of the training phase, so
    weights moving towards zero score low. Used with the gradual schedule."""

    needs = "training"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.scores: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self, layers: dict[str, nn.Module]) -> None:
        for n, m in layers.items():
            g = m.weight.grad
            if g is None:
                continue
            if n not in self.scores:
                self.scores[n] = torch.zeros_like(m.weight, dtype=torch.float32)
            self.scores[n] -= (m.weight.detach() * g).float()
        self.steps += 1

    def score(self, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        if self.steps == 0:
            raise PruningError("method 'movement' has no scores yet: they accumulate during training, so it needs a "
                               "training phase before it can prune (use the gradual schedule with epochs >= 1)")
        return {n: self.scores.get(n, torch.zeros_like(m.weight, dtype=torch.float32)) for n, m in layers.items()}


@register_method("nm", help="N:M semi-structured: keep the N largest of every M weights along the input dimension")
class NM(Method):
    structure = "nm"


@register_method("kernel", help="remove whole kernels W[o, i] of convolutions by their L1 norm")
class Kernel(Method):
    structure = "kernel"


@register_method("intra-kernel", help="pattern pruning: k positions of every kernel, from a few patterns per layer")
class IntraKernel(Method):
    structure = "pattern"


class _DecoderMethod(Method):
    """Base of the decoder-LM methods: the layers are the linear layers inside the decoder blocks (embeddings and the
    LM head stay dense, whatever ``dense_first_last`` says), and ``prune`` runs the calibration tokens through the
    blocks one at a time (``prunekit.pruning.llm.sparse.prune_decoder``)."""

    needs = "calibration"
    nm_capable = True
    layerwise = True

    def select(self, model: nn.Module, only: list[str], ignore: list[str], example_inputs: Any) -> Any:
        from prunekit.pruning.llm.sparse import select_decoder_layers

        return select_decoder_layers(model, only, ignore, example_inputs)

    def prune(self, model: nn.Module, layers: dict[str, nn.Module], sparsity: float, nm: tuple[int, int] | None,
              calib_data: Iterable | None, max_batches: int, device: str | torch.device) -> dict[str, torch.Tensor]:
        from prunekit.pruning.llm.sparse import prune_decoder

        return prune_decoder(model, self.name, None if nm else sparsity, nm, calib_data, layers, max_batches,
                             device=device).masks


@register_method("wanda", help="decoder LMs: |w| * input-activation norm per output row, block by block (Wanda)")
class Wanda(_DecoderMethod):
    pass


@register_method("sparsegpt", help="decoder LMs: OBS pruning with weight reconstruction, block by block (SparseGPT)")
class SparseGPT(_DecoderMethod):
    pass
