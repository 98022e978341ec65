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

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError, PruningError
from prunekit.measure import call_model
from prunekit.pruning.structured.criteria.base import split_batch, to_device

log = logging.getLogger(__name__)
HELD_OUT = 8  # one batch in this many is held out for the early stop
MEMORY_BUDGET = 2 << 30  # bytes of stored block inputs and targets per block (on CPU)


class _Stop(Exception):
    """Raised by a hook once the block's input/output is captured: the rest of the forward pass is not needed."""


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


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return _first_tensor(out.to_tuple())
    raise PruningError(f"a block returned {type(out).__name__}, not a tensor: it cannot be reconstructed")


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, inputs: Any, want: str) -> Any:
    """The block's (args, kwargs) (``want="input"``) or its first output tensor (``"output"``) on one batch."""
    got: list[Any] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if want == "input":
            got.append((_detach(args), _detach(kwargs)))
            raise _Stop

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
        got.append(_first_tensor(out).detach().to("cpu"))
        raise _Stop

    h = (block.register_forward_pre_hook(pre, with_kwargs=True) if want == "input"
         else block.register_forward_hook(post, with_kwargs=True))
    try:
        with contextlib.suppress(_Stop):
            call_model(model, inputs)
    finally:
        h.remove()
    if not got:
        raise PruningError("a block to reconstruct was not called by the model's forward pass on the calibration data")
    return got[0]


def _mask_of(x: Any, out: torch.Tensor) -> torch.Tensor | None:
    """``attention_mask`` of a dict batch when it has the block output's (batch, sequence) shape."""
    m = x.get("attention_mask") if isinstance(x, dict) else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and out.dim() >= 2 and tuple(m.shape) == tuple(out.shape[:2]):
        return m.to("cpu").bool()
    return None


def _loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        return (pred[mask] - target[mask]).square().mean()
    return (pred - target).square().mean()


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
    if steps <= 0 or not blocks:
        return []
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
    named_p, named_d = dict(model.named_modules()), dict(dense.named_modules())
    records = []
    modes = {m: m.training for m in [*model.modules(), *dense.modules()]}
    model.eval()  # before any forward pass: BatchNorm must not update its statistics
    dense.eval()
    try:
        order = _forward_order(model, data[0], [n for n in blocks if n in named_p])
        for name in order:
            if name not in named_d:
                raise PruningError(f"block {name!r} of the pruned model is missing from the dense model")
            records.append(_reconstruct_block(model, dense, named_p[name], named_d[name], name, blocks[name], data,
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


def _reconstruct_block(model: nn.Module, dense: nn.Module, block: nn.Module, dense_block: nn.Module, name: str,
                       layers: list[str], data: list[Any], n_val: int, steps: int, lr: float, check_every: int,
                       device: str | torch.device, seed: int, train: str = "pruned",
                       input_mix: float = 0.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    stored, size = [], 0
    for x in data:
        inp = _capture(model, block, x, "input")
        target = _capture(dense, dense_block, x, "output")
        if not stored:
            shape = tuple(_capture(model, block, x, "output").shape)
            if shape != tuple(target.shape):
                log.warning("reconstruction skips %s: its output (%s) lost channels of the dense one (%s), so it "
                            "has no dense target (compensation only)", name, shape, tuple(target.shape))
                return {"block": name, "layers": layers, "batches": 0, "loss_before": None, "loss_after": None,
                        "kept": "skipped: output pruned", "seconds": 0.0}
        dense_inp = _capture(dense, dense_block, x, "input") if input_mix and len(stored) >= n_val else None
        size += _nbytes(inp) + _nbytes(target) + _nbytes(dense_inp)
        if size > MEMORY_BUDGET and len(stored) >= 2:
            log.warning("reconstruction of %s stores %d of %d batches (calibration and augmented; %.1f GiB budget "
                        "of block inputs and targets)", name, len(stored), len(data), MEMORY_BUDGET / 2**30)
            break
        stored.append((inp, target, _mask_of(x, target), dense_inp))
    n_val = min(n_val, max(1, len(stored) // HELD_OUT))  # fewer stored (memory budget): still 1 in 8 held out
    val, fit = stored[:n_val], stored[n_val:]
    mods = dict(model.named_modules())
    if train == "block":
        params = [p for p in block.parameters() if p.dtype.is_floating_point]
    else:
        params = [p for n in layers if n in mods for p in mods[n].parameters(recurse=False)
                  if p.dtype.is_floating_point]
    if not params:
        raise PruningError(f"block {name!r}: none of its pruned layers has parameters to reconstruct")
    flags = [p.requires_grad for p in params]
    all_params = list(model.parameters())
    frozen = [p.requires_grad for p in all_params]

    mix_gen = torch.Generator().manual_seed(seed + 2)

    def run(batch: tuple, train_step: bool = False) -> torch.Tensor:
        (args, kwargs), target, mask, dense_inp = batch
        if train_step and dense_inp is not None:
            args, kwargs = _mix((args, kwargs), dense_inp, input_mix, mix_gen)
        out = _first_tensor(block(*to_device(args, device), **to_device(kwargs, device)))
        return _loss(out, target.to(out.device), None if mask is None else mask.to(out.device))

    @torch.no_grad()
    def held_out() -> float:
        return float(sum(float(run(b)) for b in val) / len(val))

    before = held_out()
    best, best_state = before, [p.detach().clone() for p in params]
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        groups = [{"params": [p], "lr": lr * max(float(p.detach().float().square().mean().sqrt()), 1e-8)}
                  for p in params]
        opt = torch.optim.Adam(groups)
        base = [g["lr"] for g in groups]
        gen = torch.Generator().manual_seed(seed)
        for step in range(steps):
            for g, b0 in zip(opt.param_groups, base):
                g["lr"] = b0 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = run(fit[int(torch.randint(len(fit), (1,), generator=gen))], train_step=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % check_every == 0 or step + 1 == steps:
                v = held_out()
                if v < best:
                    best, best_state = v, [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, s in zip(params, best_state):
                p.copy_(s)
        for p, f in zip(all_params, frozen):
            p.requires_grad_(f)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    _sync_across_ranks(params)
    kept = "reconstructed" if best < before else "compensated"
    rec = {"block": name, "layers": layers, "batches": len(stored), "loss_before": before, "loss_after": best,
           "kept": kept, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("reconstructed %s (%d layers, %d batches): held-out error %.4g -> %.4g%s", name, len(layers),
             len(stored), before, best, "" if kept == "reconstructed" else " (no gain: compensated weights kept)")
    return rec


def _mix(pruned: Any, dense: Any, p: float, gen: torch.Generator) -> Any:
    """``pruned`` with each element of its floating tensors taken, with probability ``p``, from the same-shaped
    tensor at the same place in ``dense`` (other leaves: the pruned model's)."""
    if isinstance(pruned, torch.Tensor):
        if (pruned.is_floating_point() and isinstance(dense, torch.Tensor) and dense.shape == pruned.shape):
            return torch.where(torch.rand(pruned.shape, generator=gen) < p, dense, pruned)
        return pruned
    if isinstance(pruned, dict) and isinstance(dense, dict):
        return {k: _mix(v, dense.get(k), p, gen) for k, v in pruned.items()}
    if isinstance(pruned, (tuple, list)) and isinstance(dense, (tuple, list)) and len(dense) == len(pruned):
        return type(pruned)(_mix(a, b, p, gen) for a, b in zip(pruned, dense))
    return pruned


def _sync_across_ranks(params: list[torch.Tensor]) -> None:
    """torchrun: every rank fitted the block on its own calibration batches; average the fitted weights so all ranks
    hold one model (and the next block's inputs agree); a no-op in one process."""
    from prunekit.distributed import all_reduce_mean, is_distributed

    if not is_distributed():
        return
    with torch.no_grad():
        for i, v in all_reduce_mean({f"{i:06d}": p for i, p in enumerate(params)}).items():
            params[int(i)].copy_(v)


def check_token_batch(batch: Any, field: str, value: Any, key: str = "input_ids", flag: str = "") -> None:
    """``ConfigError`` naming ``field=value`` (and the CLI ``flag``) unless ``batch`` (its inputs) is a dict holding a
    ``key`` tensor."""
    x = split_batch(batch)[0] if batch is not None else None
    if not isinstance(x, dict) or not isinstance(x.get(key), torch.Tensor):
        raise ConfigError(f"{field}={value} perturbs token batches (dicts with {key!r}, as a tokenizer returns them); "
                          f"the calibration batches are {type(x).__name__}: set {field}=0"
                          + (f" ({flag} 0)" if flag else ""))


def token_noise(p: float = 0.3, key: str = "input_ids", mask_key: str = "attention_mask"
                ) -> Callable[[Any, torch.Generator], Any]:
    """An ``augment`` for token batches (dicts with ``input_ids`` and ``attention_mask``, as tokenizers return
    them): each real token except the first and the last of its row (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``;
    left or right padding) is replaced, with probability ``p``, by a token drawn from the batch's own real tokens
    (the calibration text's unigram distribution, so no vocabulary is needed and the text stays in its domain; a
    token may be drawn in its own place, so slightly fewer than ``p`` change). The noise is drawn on the CPU
    generator and moved to the batch's device: the same on CPU and GPU."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"token_noise(p={p}) must be in (0, 1)")

    def apply(batch: Any, gen: torch.Generator) -> Any:
        check_token_batch(batch, "token_noise: augment_copies", "N", key)
        ids = batch[key]
        mask = batch.get(mask_key)
        real = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
        rows = torch.arange(ids.shape[0], device=ids.device)
        inner = real.clone()
        inner[rows, real.long().argmax(1)] = False  # each row's first real token
        inner[rows, real.long().cumsum(1).argmax(1)] = False  # and its last
        pool = ids[inner]
        if pool.numel() == 0:
            return dict(batch)
        hit = inner & (torch.rand(ids.shape, generator=gen) < p).to(ids.device)
        new = ids.clone()
        new[hit] = pool[torch.randint(pool.numel(), (int(hit.sum()),), generator=gen).to(ids.device)]
        return {**batch, key: new}

    return apply
