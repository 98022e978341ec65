"""Per-channel activation statistics (mean, variance, optionally covariance) at each layer's post-activation point.

Where a layer ``L``'s channels are measured (its *point*), found on torch-pruning's graph of the model:

1. follow ``L``'s output through norms (BN, GN, LN, IN) and unary activations (ReLU, ReLU6, GELU, SiLU, ...);
2. if that tensor is read by a conv/linear layer, the point is that layer's input (a forward pre-hook: the exact
   tensor, no activation re-implemented, safe with torchvision's reused ``relu`` modules);
3. if it is summed into a residual stream, the point is the stream where the next conv/linear reads it;
4. otherwise the output of the last norm (or of ``L``) with the activations of step 1 applied by us.

``points={layer: "module" | "module:input" | callable}`` overrides this (a callable is applied to ``L``'s output).
The inputs of every conv/linear layer that consumes ``L``'s channels are measured too (``StatsDict.inputs``, keyed
by the consumer's name): bias compensation and the variance criteria read these. A point shared by a producer and a
consumer (the usual case: ``fc1 -> GELU -> fc2``) is measured once.

Accumulation is Chan et al.'s parallel update in float64 of per-chunk (count, mean, M2) sums, each chunk shifted by
the running mean first, so large offsets cost no precision. Padded tokens are left out when a batch is a dict with an
``attention_mask`` and the tensor is ``[B, T, C]``.

Example:
    >>> stats = collect_stats(model, loader, ["blocks.0.mlp.fc1"], max_batches=8)
    >>> stats["blocks.0.mlp.fc1"].var.shape  # float64 [hidden]
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.batch import call_model, split_batch, to_device
from prunekit.errors import PruningError, closest

# the moments and the points live in their own modules; their names stay importable from here
from prunekit.pruning.structured.channel_stats import (  # noqa: F401
    CHUNK,
    ChannelStats,
    StatsDict,
    _Accumulator,
    _Moments,
    _pack,
    _unpack,
    sync_stats,
)
from prunekit.pruning.structured.stat_points import (  # noqa: F401
    LAYERS,
    OP,
    Consumer,
    _dim_of,
    _Finder,
    _override,
    _Point,
    _trace,
    channels_in,
    channels_out,
    consumers,
    is_grouped,
)

log = logging.getLogger(__name__)

MAX_COV_FEATURES = 8192  # wider consumer inputs get no covariance (a [C, C] float64 matrix would be too large)
MAX_PATCH_FEATURES = 4608  # k x k conv consumers up to C * k * k = 512 * 3 * 3 get patch covariance (lstsq)
PATCH_ROWS = 4096  # patch rows (positions) sampled per batch for a k x k conv's patch covariance
PATCHES = "#patches"  # StatsDict.inputs[f"{conv}{PATCHES}"]: statistics of the conv's unfolded input patches


def collect_stats(model: nn.Module, calib_data: Iterable | None, layer_names: Iterable[str], *,
                  max_batches: int | None = None, device: str | torch.device = "cpu", attention_mask: bool = True,
                  covariance: bool = False, points: Mapping[str, str | Callable] | None = None,
                  graph: Any = None, inputs: bool = True) -> StatsDict:
    """Per-channel statistics of ``layer_names``' outputs at their post-activation points (module docstring).

    Args:
        model: the model (run in eval mode under ``torch.no_grad``; its mode is restored).
        calib_data: iterable of batches: tensors, ``(inputs, labels)`` pairs or dicts (``attention_mask`` used).
        layer_names: conv/linear layers whose output channels are described.
        max_batches: use at most this many batches.
        device: where the batches are sent (the model is not moved).
        attention_mask: leave out padded tokens of ``[B, T, C]`` tensors when batches carry an ``attention_mask``.
        covariance: also estimate the covariance of consumer inputs that ``lstsq`` compensation can use
            (linear and 1x1 conv layers up to ``MAX_COV_FEATURES`` features; for k x k convs up to
            ``MAX_PATCH_FEATURES`` = C * k * k, the covariance of their unfolded input patches, from ``PATCH_ROWS``
            positions sampled per batch, under ``StatsDict.inputs[conv + PATCHES]``).
        points: ``{layer: "module"}`` (that module's output), ``{layer: "module:input"}`` or ``{layer: fn}`` (``fn``
            applied to the layer's own output) instead of the automatic point.
        graph: torch-pruning ``DependencyGraph`` (or an object with ``.DG``) of ``model``; traced on the first
            batch when not given.
        inputs: also measure the inputs of the layers consuming these channels (``StatsDict.inputs``).

    Example:
        >>> stats = collect_stats(model, loader, ["layer1.0.conv1"], max_batches=4)
        >>> stats["layer1.0.conv1"].point  # 'input of layer1.0.conv2'
    """
    if calib_data is None:
        raise PruningError("collecting channel statistics needs calibration data: pass calib_data=...")
    if calib_data is None:
        raise PruningError("collecting channel statistics needs calibration data: pass calib_data=...")
    names, points = list(dict.fromkeys(layer_names)), dict(points or {})
    modules = dict(model.named_modules())
    _check_layers([*names, *points], modules)
    batches = iter(calib_data)
    first = next(batches, None)
    if first is None:
        raise PruningError("collecting channel statistics got no calibration batches")
    finder = None
    if inputs or any(n not in points for n in names):
        dg = getattr(graph, "DG", graph)
        finder = _Finder(model, _trace(model, to_device(split_batch(first)[0], device)) if dg is None else dg)
    acc = _Points(modules)
    producer = {n: acc.register(_override(n, points[n], modules) if n in points else finder.point(n),
                                channels_out(modules[n]), False) for n in names}
    consumer = acc.consumers(names, finder, covariance) if inputs else {}
    log.debug("statistics at %d points for %d layers", len(acc.accs), len(names))
    n_batches = _run(model, itertools.chain([first], batches), acc, max_batches, device, attention_mask)
    idle = [p.describe() for p, a in acc.accs.values() if a.count == 0]
    if idle:
        raise PruningError(f"no activations were seen at {idle[0]} (is that module called in forward?)")
    by_acc = {id(a): a.result() for _, a in acc.accs.values()}
    log.info("channel statistics of %d layers from %d batches (%d points)", len(names), n_batches, len(acc.accs))
    return StatsDict({n: by_acc[id(a)] for n, a in producer.items()},
                     inputs={c: by_acc[id(a)] for c, a in consumer.items()})


def _check_layers(names: list[str], modules: dict[str, nn.Module]) -> None:
    for n in names:
        if not isinstance(modules.get(n), LAYERS):
            what = "not a conv/linear layer" if n in modules else "not a module of the model"
            near = closest(n, [k for k, m in modules.items() if isinstance(m, LAYERS)])
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise PruningError(f"channel statistics: {n!r} is {what}{hint}")


class _Points:
    """The measuring points of one collection, each with its accumulator (a point shared by a producer and a
    consumer is measured once)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.accs: dict[tuple, tuple[_Point, _Accumulator]] = {}

    def register(self, p: _Point, channels: int, cov: bool) -> _Accumulator:
        if p.module not in self.modules:
            raise PruningError(f"channel statistics: point module {p.module!r} is not a module of the model")
        if p.key in self.accs:
            acc = self.accs[p.key][1]
            if acc.channels != channels:
                raise PruningError(f"{p.describe()} is measured as {acc.channels} and {channels} channels")
            if cov and not acc.covariance:
                acc.enable_covariance()
            return acc
        self.accs[p.key] = (p, _Accumulator(channels, cov, p.describe()))
        return self.accs[p.key][1]

    def consumers(self, names: list[str], finder: _Finder, covariance: bool) -> dict[str, _Accumulator]:
        """The inputs of every layer consuming ``names``' channels (and, for lstsq, k x k convs' input patches)."""
        consumer = {}
        for n in names:
            for c in finder.consumers(n):
                m = self.modules[c]
                cov = covariance and channels_in(m) <= MAX_COV_FEATURES and lstsq_supported(m)
                consumer[c] = self.register(_Point(c, "input", _dim_of(m)), channels_in(m), cov)
                if covariance and patch_supported(m):
                    consumer[c + PATCHES] = self.register(_patch_point(c, m), patch_features(m), True)
        return consumer


def _run(model: nn.Module, batches: Iterator[Any], points: _Points, max_batches: int | None,
         device: str | torch.device, attention_mask: bool) -> int:
    """Forward ``batches`` in eval mode with a hook at every point; the number of batches seen."""
    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = [_hook(points.modules[p.module], p, acc, state) for p, acc in points.accs.values()]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                x = to_device(split_batch(batch)[0], device)
                mask = x.get("attention_mask") if attention_mask and isinstance(x, dict) else None
                state["mask"] = None if mask is None else mask.bool()
                call_model(model, x)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return n_batches


def _hook(module: nn.Module, p: _Point, acc: _Accumulator, state: dict) -> Any:
    def measure(t: Any) -> None:
        if isinstance(t, (tuple, list)):
            t = t[0]
        if not isinstance(t, torch.Tensor):
            raise PruningError(f"statistics at {p.describe()}: the module passes no tensor there")
        for _, fn in p.fns:
            t = fn(t)
        acc.update(t, p.dim, state["mask"])

    if p.side == "input":
        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            measure(args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))

        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return module.register_forward_hook(lambda mod, args, out: measure(out))


def lstsq_supported(m: nn.Module) -> bool:
    """Linear layers and 1x1 convs (groups=1, no padding): every output is an affine map of one input position."""
    if isinstance(m, nn.Linear):
        return True
    if (not isinstance(m, nn.modules.conv._ConvNd) or m.transposed or m.groups != 1
            or any(k != 1 for k in m.kernel_size)):
        return False
    return m.padding == "valid" if isinstance(m.padding, str) else all(p == 0 for p in m.padding)


def patch_supported(m: nn.Module) -> bool:
    """A 2-D conv with a kernel larger than 1x1 (groups=1, zero padding given as numbers) whose unfolded input
    (``C * k * k`` features) is at most ``MAX_PATCH_FEATURES`` wide: ``lstsq`` refits it in patch space."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and not m.transposed and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and any(k != 1 for k in m.kernel_size)
            and patch_features(m) <= MAX_PATCH_FEATURES)


def patch_features(m: nn.Conv2d) -> int:
    return m.in_channels * m.kernel_size[0] * m.kernel_size[1]


def _patch_point(name: str, m: nn.Conv2d) -> _Point:
    """The input of conv ``name`` as unfolded patches: ``[rows, C * kh * kw]`` (F.unfold's feature order, the order
    of ``m.weight.reshape(O, -1)``), ``PATCH_ROWS`` positions per batch drawn by a generator of fixed seed."""
    gen = torch.Generator().manual_seed(0)
    geometry = dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)

    def patches(x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        b = x.shape[0]
        f, n = F.unfold(x[:1], **geometry).shape[1:]  # features C*kh*kw, positions L per image
        pick = torch.randperm(b * n, generator=gen)[:PATCH_ROWS].sort().values.to(x.device)
        step, out = max(1, CHUNK * 16 // (f * n)), []  # unfold a few images at a time
        for i in range(0, b, step):
            sel = pick[(pick >= i * n) & (pick < (i + step) * n)] - i * n
            if sel.numel():
                out.append(F.unfold(x[i:i + step], **geometry).transpose(1, 2).reshape(-1, f)[sel])
        return torch.cat(out)  # (rows, F)

    return _Point(name, "input", -1, (("patches", patches),))
