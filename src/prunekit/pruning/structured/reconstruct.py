"""Block-wise reconstruction after pruning: fit the pruned layers of each block to the dense model's block output.

Compensation (``mean``, ``lstsq``) refits one linear map per consumer in closed form, from the statistics of the
*dense* model's inputs. What it cannot do: adjust the producers' kept weights (the map through the nonlinearity), and
correct the error that earlier pruned blocks pass on. Reconstruction does both, on the calibration data alone (no
labels, no end-to-end training): for every block that contains a pruned group, in forward order,

    minimise  || block_pruned(x_pruned) - block_dense(x_dense) ||^2

over the parameters of the block's pruned layers (the layers that lost output or input channels), where ``x_pruned``
is the block's input in the pruned model (every earlier block already reconstructed) and ``x_dense`` the dense model's.
The target is the dense model's output on the *dense* input, so each block also absorbs the error its input carries
(the sequential, error-correcting layer-wise reconstruction of post-training compression: AdaRound / BRECQ for
quantisation, the layer-wise reconstruction of OBC / SparseGPT and of the "blocks" of ZipLM for pruning).

A block is the repeated block (an element of a ``ModuleList`` / ``Sequential``) around the innermost module that
holds all the layers of a pruned group: a transformer layer for an FFN group (so the target includes the residual
path and the norm), a ResNet block for its internal channels. A group whose layers only meet at the model's root is
left to compensation (reconstructing the whole model would be fine-tuning), and a block whose output lost channels
(the residual stream was pruned) has no dense target and is skipped, with a warning. Adam with a cosine decay, each
parameter's step scaled by its own RMS (``lr`` is relative, so one value suits weights of any scale), one stored
calibration batch per step. ``1/8`` of the clean batches (at least one) is held out: the block is checked every
``check_every`` steps and keeps its best held-out state, and a block whose held-out error does not fall keeps its
compensated weights (reported): the step cannot make a block worse on data it was not fitted on. When the
calibration batches carry an ``attention_mask`` of the block output's (batch, sequence) shape, padding positions are
left out of the loss. BatchNorm and dropout stay in eval mode (BatchNorm recalibration runs before, not after).
A few hundred sentences are easy to over-fit (the calibration error falls far more than the error on unseen text):
``augment`` (``token_noise``: each token swapped, with some probability, for another token of the same batch)
adds ``augment_copies`` perturbed copies of every training batch, whose targets are again the dense model's outputs,
so the fit sees more of the input space around the user's text without any other data (``prune(...,
reconstruct_augment=N)``). Two more guards against it, for any block type: ``train="block"`` fits every parameter
of the block (its norms and attention can absorb error the pruned layers cannot), and ``input_mix`` feeds, at each
step, a random share of the elements of the *dense* model's block input in place of the pruned model's (QDrop's
random drop, from quantisation reconstruction): the block is fitted on inputs between the clean and the damaged
ones, not only on the latter. Under torchrun each rank fits a block on its own batches and the fitted weights are
averaged across ranks before the next block, so every rank ends with the same model.

Example:
    >>> dense = copy.deepcopy(model)
    >>> report = prune(model, example, "variance", ratio=0.5, calib_data=batches, compensate="lstsq")
    >>> reconstruct(model, dense, batches, blocks_of(model, report.groups), steps=400)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.batch import call_model, split_batch, to_device
from prunekit.errors import ConfigError, PruningError

# the augmentations and the per-block steps live in their own modules; their names stay importable from here
from prunekit.pruning.structured.reconstruct_augment import check_token_batch, token_noise  # noqa: F401
from prunekit.pruning.structured.reconstruct_block import (  # noqa: F401
    HELD_OUT,
    MEMORY_BUDGET,
    _mask_of,
    _mix,
    reconstruct_block,
)

log = logging.getLogger(__name__)


def blocks_of(model: nn.Module, groups: Sequence[Any]) -> dict[str, list[str]]:
    """Block name -> the pruned layers (conv/linear) inside it, from the engine's group records (``layers`` and
    ``consumers``). The block is the repeated block (an element of a ``ModuleList`` / ``Sequential``) around the
    innermost module holding all of a group's layers, else that module; groups meeting only at the root are left
    out, and a block inside another chosen block is merged into the outer one."""
    named = dict(model.named_modules())
    found: dict[str, set[str]] = {}
    for g in groups:
        layers = [n for n in [*g.layers, *g.consumers] if n in named]
        if not layers:
            continue
        parts = [n.split(".") for n in layers]
        common: list[str] = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        # a group of one layer (its own consumer) still needs a block around it: its parent
        while common and ".".join(common) in layers:
            common.pop()
        if not common:
            continue
        # climb to the repeated block it sits in (an element of a ModuleList / Sequential: a transformer layer, a
        # ResNet block), so the block's output includes its residual path: ViT's "blocks.3.mlp" -> "blocks.3"
        for depth in range(len(common), 0, -1):
            parent = named.get(".".join(common[:depth - 1]), model) if depth > 1 else model
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                common = common[:depth]
                break
        found.setdefault(".".join(common), set()).update(layers)
    out: dict[str, list[str]] = {}
    for name in sorted(found, key=len):
        outer = next((o for o in out if name.startswith(o + ".")), None)
        if outer is not None:
            out[outer] = sorted(set(out[outer]) | found[name])
        else:
            out[name] = sorted(found[name])
    return out


def _check_args(train: str, augment: Callable | None, augment_copies: int, input_mix: float) -> None:
    """``ConfigError`` naming the ``reconstruct`` argument that is out of range or does nothing."""
    if train not in ("pruned", "block"):
        raise ConfigError(f"reconstruct(train={train!r}) is not a choice: 'pruned' (the block's pruned layers) or "
                          "'block' (every parameter of the block)")
    if augment_copies < 0:
        raise ConfigError(f"reconstruct(augment_copies={augment_copies}) must be >= 0")
    if augment_copies and augment is None:
        raise ConfigError(f"reconstruct(augment_copies={augment_copies}) needs augment= (e.g. token_noise())")
    if augment is not None and not augment_copies:
        raise ConfigError("reconstruct(augment=...) with augment_copies=0 would not augment anything: give "
                          "augment_copies >= 1 or leave augment out")
    if not 0.0 <= input_mix < 1.0:
        raise ConfigError(f"reconstruct(input_mix={input_mix}) must be in [0, 1)")


def _calibration(calib_data: Iterable, max_batches: int, device: str | torch.device, seed: int,
                 augment: Callable | None, augment_copies: int) -> tuple[list[Any], int]:
    """``(batches, n_val)``: the first ``max_batches`` inputs on ``device``, the first ``n_val`` held out (clean),
    then ``augment_copies`` perturbed copies of each training batch."""
    data = []
    for i, batch in enumerate(calib_data):
        if i >= max_batches:
            break
        data.append(to_device(split_batch(batch)[0], device))
    if len(data) < 2:
        raise PruningError(f"reconstruction needs at least 2 calibration batches (one is held out), got {len(data)}")
    n_val = max(1, len(data) // HELD_OUT)  # the first n_val (clean) batches are held out, never augmented
    if augment is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        data = data + [augment(x, gen) for _ in range(augment_copies) for x in data[n_val:]]
    return data, n_val


def reconstruct(model: nn.Module, dense: nn.Module, calib_data: Iterable, blocks: dict[str, list[str]], *,
                steps: int = 400, lr: float = 0.01, max_batches: int = 50, check_every: int = 50,
                device: str | torch.device = "cpu", seed: int = 0, train: str = "pruned",
                augment: Callable[[Any, torch.Generator], Any] | None = None,
                augment_copies: int = 0, input_mix: float = 0.0) -> list[dict[str, Any]]:
    """Reconstruct each block of ``blocks`` (``blocks_of``) of the pruned ``model`` towards ``dense`` (the model before
    pruning, same module names), in forward order. Returns one record per block: ``block``, ``layers``,
    ``batches`` (stored: held-out, training, augmented), ``loss_before``/``loss_after`` (held-out mean squared
    error; ``None`` when skipped), ``kept`` (``"reconstructed"``; ``"compensated"`` when the held-out error did not
    fall; ``"skipped: output pruned"``), ``seconds``.

    Args:
        steps: optimisation steps per block (one calibration batch each).
        lr: Adam step relative to each parameter's RMS.
        max_batches: calibration batches used (stored on CPU: the block inputs and dense outputs).
        check_every: steps between held-out checks (the best state is kept).
        train: ``"pruned"`` fits the block's pruned layers, ``"block"`` every parameter of the block.
        augment: ``augment(batch, generator) -> batch``, a perturbation of a calibration batch (e.g.
            ``token_noise``): ``augment_copies`` perturbed copies of every *training* batch join the fit (the dense
            model's outputs on them are the targets); the held-out batches stay clean.
        input_mix: probability that a training step feeds an element of the *dense* model's block input in place
            of the pruned model's (QDrop's random drop, for pruning): the block learns both to map clean inputs and to
            correct the error its input carries, and sees inputs between the two (any block type). ``0``: pruned
            inputs only. The held-out check always uses the pruned inputs.
    """
    _check_args(train, augment, augment_copies, input_mix)
    if steps <= 0 or not blocks:
        return []
    data, n_val = _calibration(calib_data, max_batches, device, seed, augment, augment_copies)
    named_p, named_d = dict(model.named_modules()), dict(dense.named_modules())
    records = []
    modes = {m: m.training for m in [*model.modules(), *dense.modules()]}
    model.eval()  # before any forward pass: BatchNorm must not update its statistics
    dense.eval()
    try:
        for name in _forward_order(model, data[0], [n for n in blocks if n in named_p]):
            if name not in named_d:
                raise PruningError(f"block {name!r} of the pruned model is missing from the dense model")
            records.append(reconstruct_block(model, dense, named_p[name], named_d[name], name, blocks[name], data,
                                             n_val, steps, lr, check_every, device, seed, train, input_mix))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return records


def _forward_order(model: nn.Module, inputs: Any, names: list[str]) -> list[str]:
    named = dict(model.named_modules())
    seen: list[str] = []
    hooks = [named[n].register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen else None)
             for n in names]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        log.warning("reconstruction skips %s: not called by the forward pass", ", ".join(missing))
    return seen
