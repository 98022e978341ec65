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

import copy
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunekit.errors import PruningError, closest
from prunekit.measure import call_model
from prunekit.pruning.structured.criteria.base import split_batch, to_device
from prunekit.pruning.structured.graph import deep_shape_inference

log = logging.getLogger(__name__)

MAX_COV_FEATURES = 8192  # wider consumer inputs get no covariance (a [C, C] float64 matrix would be too large)
MAX_PATCH_FEATURES = 4608  # k x k conv consumers up to C * k * k = 512 * 3 * 3 get patch covariance (lstsq)
PATCH_ROWS = 4096  # patch rows (positions) sampled per batch for a k x k conv's patch covariance
PATCHES = "#patches"  # StatsDict.inputs[f"{conv}{PATCHES}"]: statistics of the conv's unfolded input patches
CHUNK = 1 << 20  # elements reduced at a time (keeps temporaries small)
LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
OP = tp.ops.OPTYPE
_NORMS = {OP.BN, OP.GN, OP.IN, OP.LN}
_READERS = {OP.CONV, OP.LINEAR, OP.DEPTHWISE_CONV}
_ACTIVATIONS: dict[str, Callable[[Any], Callable[[torch.Tensor], torch.Tensor]]] = {
    "ReluBackward0": lambda g: F.relu,
    "HardtanhBackward0": lambda g: partial(F.hardtanh, min_val=float(g._saved_min_val),
                                           max_val=float(g._saved_max_val)),
    "GeluBackward0": lambda g: partial(F.gelu, approximate=g._saved_approximate),
    "SiluBackward0": lambda g: F.silu,
    "HardswishBackward0": lambda g: F.hardswish,
    "HardsigmoidBackward0": lambda g: F.hardsigmoid,
    "MishBackward0": lambda g: F.mish,
    "SigmoidBackward0": lambda g: torch.sigmoid,
    "TanhBackward0": lambda g: torch.tanh,
    "LeakyReluBackward0": lambda g: partial(F.leaky_relu, negative_slope=float(g._saved_negative_slope)),
    "EluBackward0": lambda g: partial(F.elu, alpha=float(g._saved_alpha)),
}
_IDENTITY = {"CloneBackward0", "ToCopyBackward0", "AliasBackward0"}


@dataclass
class ChannelStats:
    """Statistics of ``C`` channels over ``count`` samples (every position and token counts as a sample).

    Attributes:
        mean: float64 ``[C]``.
        var: float64 ``[C]``, population variance (divided by ``count``).
        count: number of samples.
        cov: float64 ``[C, C]`` population covariance, or ``None``.
        point: where they were measured, e.g. ``"input of layer1.0.conv2"``.
        halves: with a covariance, the statistics of two disjoint halves of the batches (alternating), or
            ``None``; ``lstsq`` compensation chooses its ridge by cross-validation on them.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int
    cov: torch.Tensor | None = None
    point: str = ""
    halves: tuple[ChannelStats, ChannelStats] | None = None

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def merge(self, other: ChannelStats) -> ChannelStats:
        """The statistics of both sample sets together (Chan et al.'s parallel update)."""
        if other.channels != self.channels:
            raise PruningError(f"cannot merge statistics of {self.channels} and {other.channels} channels "
                               f"({self.point or '?'} / {other.point or '?'})")
        n = self.count + other.count
        if other.count == 0 or self.count == 0:
            src = self if other.count == 0 else other
            return copy.deepcopy(src)
        delta = other.mean - self.mean
        w = self.count * other.count / n
        mean = self.mean + delta * (other.count / n)
        var = (self.var * self.count + other.var * other.count + delta.square() * w) / n
        cov = halves = None
        if self.cov is not None and other.cov is not None:
            cov = (self.cov * self.count + other.cov * other.count + torch.outer(delta, delta) * w) / n
        if self.halves is not None and other.halves is not None:
            halves = (self.halves[0].merge(other.halves[0]), self.halves[1].merge(other.halves[1]))
        return ChannelStats(mean, var, n, cov, self.point or other.point, halves)


class StatsDict(dict):
    """``{layer name: ChannelStats of its output channels}`` plus ``inputs``: ``{consumer name: ChannelStats of
    its input features}``. Keyed by module names, so it applies to a deep copy of the model as well."""

    def __init__(self, *args: Any, inputs: Mapping[str, ChannelStats] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.inputs: dict[str, ChannelStats] = dict(inputs or {})


class _Moments:
    """Running (count, mean, M2[, co-moment]) in float64, updated chunk by chunk (Chan et al.)."""

    def __init__(self, channels: int, covariance: bool):
        self.channels, self.count = channels, 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)
        self.cxx = torch.zeros(channels, channels, dtype=torch.float64) if covariance else None

    def to(self, device: torch.device) -> None:
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)
        if self.cxx is not None:
            self.cxx = self.cxx.to(device)

    def _shift(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return self.mean.to(x.dtype) if self.count else x.mean(dims)

    def rows(self, x: torch.Tensor) -> None:  # x: [N, C]
        step = max(1, CHUNK // max(1, self.channels))
        for c in x.split(step):
            k = self._shift(c, (0,))
            d = c - k  # (n, C), small values: no cancellation below
            s1 = d.sum(0).double()
            s2 = torch.linalg.vecdot(d, d, dim=0).double()
            cxx = None
            if self.cxx is not None:
                dd = d.double()
                cxx = dd.T @ dd - torch.outer(s1, s1) / c.shape[0]
            self._merge(c.shape[0], k.double() + s1 / c.shape[0], s2 - s1.square() / c.shape[0], cxx)

    def planes(self, x: torch.Tensor) -> None:  # x: [B, C, S]
        step = max(1, CHUNK // max(1, x[0].numel()))
        for c in x.split(step):
            n = c.shape[0] * c.shape[2]
            k = self._shift(c, (0, 2))
            d = c - k.view(1, -1, 1)
            s1 = d.sum((0, 2)).double()
            s2 = torch.linalg.vecdot(d, d, dim=2).sum(0).double()
            self._merge(n, k.double() + s1 / n, s2 - s1.square() / n, None)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor, cxx: torch.Tensor | None) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        w = self.count * n / total
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2.clamp_min(0) + delta.square() * w
        if self.cxx is not None:
            self.cxx = self.cxx + cxx + torch.outer(delta, delta) * w
        self.count = total

    def result(self, where: str) -> ChannelStats:
        n = max(self.count, 1)
        cov = None if self.cxx is None else (self.cxx / n).cpu()
        return ChannelStats(self.mean.cpu(), (self.m2 / n).cpu(), self.count, cov, where)


class _Accumulator:
    """The statistics of one point. With covariance, batches alternate between two halves (merged at the end;
    the halves let ``lstsq`` compensation choose its ridge by cross-validation)."""

    def __init__(self, channels: int, covariance: bool, where: str):
        self.channels, self.where = channels, where
        self.calls = 0
        self.parts = [_Moments(channels, False)]
        if covariance:
            self.enable_covariance()

    def enable_covariance(self) -> None:
        if self.calls:
            raise PruningError(f"statistics at {self.where}: covariance must be enabled before any data")
        self.parts = [_Moments(self.channels, True), _Moments(self.channels, True)]

    @property
    def covariance(self) -> bool:
        return len(self.parts) == 2

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    def update(self, x: torch.Tensor, dim: int | None, mask: torch.Tensor | None) -> None:
        x = x.detach()
        if not x.is_floating_point():
            raise PruningError(f"statistics at {self.where}: expected a float tensor, got {x.dtype}")
        dim = self._channel_dim(x, dim)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        part = self.parts[self.calls % len(self.parts)]
        self.calls += 1
        if part.mean.device != x.device:
            part.to(x.device)
        xl = x.movedim(dim, -1)
        if mask is not None and xl.dim() == 3 and tuple(xl.shape[:2]) == tuple(mask.shape):
            part.rows(xl[mask])  # [N, C]: real tokens only
        elif dim == x.dim() - 1 or self.covariance or x.dim() == 2:
            part.rows(xl.reshape(-1, self.channels))  # [N, C]
        else:
            part.planes(x.reshape(x.shape[0], self.channels, -1))  # NCHW as [B, C, S]: no transposed copy

    def _channel_dim(self, x: torch.Tensor, dim: int | None) -> int:
        dims = [dim % x.dim()] if dim is not None and x.dim() > 1 else [x.dim() - 1, 1]
        for d in dims:
            if x.dim() > d and x.shape[d] == self.channels:
                return d
        raise PruningError(f"statistics at {self.where}: expected {self.channels} channels, got a tensor of shape "
                           f"{tuple(x.shape)}; pass points={{layer: ...}} to measure elsewhere")

    def result(self) -> ChannelStats:
        if not self.covariance:
            return self.parts[0].result(self.where)
        a, b = (p.result(self.where) for p in self.parts)
        full = a.merge(b)
        full.halves = (a, b) if a.count and b.count else None
        return full


@dataclass(frozen=True)
class _Point:
    module: str
    side: str  # "input" | "output"
    dim: int | None = None  # channel dim (1 or -1); None: infer from the channel count
    fns: tuple[tuple[str, Callable], ...] = ()  # activations applied to the hooked tensor first

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return self.module, self.side, tuple(label for label, _ in self.fns)

    def describe(self) -> str:
        return f"{self.side} of {self.module}" + "".join(f" + {label}" for label, _ in self.fns)


def _dim_of(m: nn.Module) -> int | None:
    if isinstance(m, (nn.Linear, nn.LayerNorm)):
        return -1
    if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                      nn.modules.instancenorm._InstanceNorm)):
        return 1
    return None


def channels_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def channels_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


# --------------------------------------------------------------------------------------------- finding points
class _Finder:
    """Finds post-activation points and consumers on torch-pruning's dependency graph."""

    def __init__(self, model: nn.Module, dg: Any):
        self.dg = dg
        self.modules = dict(model.named_modules())
        self.names = {m: n for n, m in self.modules.items()}
        self.order = {n: i for i, n in enumerate(self.modules)}

    def _name(self, node: Any) -> str | None:
        return self.names.get(node.module) if isinstance(node.module, nn.Module) else None

    @staticmethod
    def _activation(node: Any) -> tuple[str, Callable] | None | bool:
        """(label, fn) for a unary activation node, None for an identity op, False for anything else."""
        name = node.grad_fn.name() if node.type == OP.ELEMENTWISE and node.grad_fn is not None else ""
        if name in _IDENTITY:
            return None
        make = _ACTIVATIONS.get(name)
        return False if make is None else (name.removesuffix("Backward0").lower(), make(node.grad_fn))

    def _reader(self, node: Any, channels: int) -> str | None:
        """A conv/linear layer with ``channels`` inputs whose input is exactly ``node``'s output (also through
        F.linear's reshape/addmm on ``[B, T, C]`` inputs)."""
        found = []
        for o in node.outputs:
            cur = o
            for _ in range(2):  # Linear on [B, T, C]: reshape -> addmm -> the Linear's node
                gf = cur.grad_fn.name() if cur.grad_fn is not None else ""
                if cur.type in _READERS or len(cur.outputs) != 1:
                    break
                if not (cur.type == OP.RESHAPE or gf.startswith(("AddmmBackward", "MmBackward"))):
                    break
                cur = cur.outputs[0]
            name = self._name(cur)
            if (cur.type in _READERS and name is not None and (cur is not o or len(_data_inputs(o)) == 1)
                    and channels_in(self.modules[name]) == channels):
                found.append(name)
        return min(found, key=self.order.__getitem__) if found else None

    def point(self, layer: str) -> _Point:
        node = self.dg.module2node.get(self.modules[layer])
        if node is None:
            raise PruningError(f"layer {layer!r} is not in the traced graph (is it called in forward?); pass "
                               f"points={{{layer!r}: ...}} to say where its channels are measured")
        last, fns = layer, []
        while len(node.outputs) == 1 and len(_data_inputs(node.outputs[0])) == 1:
            nxt = node.outputs[0]
            act = self._activation(nxt)
            if nxt.type in _NORMS and self._name(nxt) is not None:
                last, fns = self._name(nxt), []
            elif act is False:
                break
            elif act is not None:
                fns.append(act)
            node = nxt
        channels = channels_out(self.modules[layer])
        reader = self._reader(node, channels) or self._stream_reader(node, channels)
        if reader is not None:
            return _Point(reader, "input", _dim_of(self.modules[reader]))
        return _Point(last, "output", _dim_of(self.modules[last]), tuple(fns))

    def _stream_reader(self, node: Any, channels: int) -> str | None:
        """Residual stream: ``node`` is added to a stream; the first conv/linear reading the stream after the add
        (and its norm/activation) sees the group's post-activation channels."""
        if len(node.outputs) != 1 or node.outputs[0].grad_fn is None:
            return None
        cur = node.outputs[0]
        if cur.grad_fn.name() not in ("AddBackward0", "AddBackward1"):
            return None
        for _ in range(8):
            reader = self._reader(cur, channels)
            if reader is not None:
                return reader
            nxt = [o for o in cur.outputs if len(_data_inputs(o)) == 1 and (o.type in _NORMS or self._activation(o))]
            if len(nxt) != 1:
                return None
            cur = nxt[0]
        return None

    def consumers(self, layer: str) -> list[str]:
        """Conv / linear layers (grouped convs too) whose input channels are coupled to ``layer``'s output
        channels."""
        m = self.modules[layer]
        pruner = self.dg.get_pruner_of_module(m)
        group = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(channels_out(m))))
        return [c.name for c in consumers(group, self.names, grouped=True)]


def _data_inputs(node: Any) -> list[Any]:
    """Input nodes that carry activations (not a weight's transpose feeding F.linear's addmm)."""
    return [i for i in node.inputs if i.inputs or i.type != OP.ELEMENTWISE]


@dataclass
class Consumer:
    """A conv/linear layer losing input channels in a group: ``idxs`` are its input indices, ``root_idxs`` the
    group root's channel each one belongs to."""

    name: str
    module: nn.Module
    idxs: list[int]
    root_idxs: list[int]


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv whose output channels each read several input channels (1 < groups < in_channels); a
    depthwise conv (groups = in_channels) loses an output channel with each input channel instead."""
    return isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels


def consumers(group: Any, names: Mapping[nn.Module, str] | None = None, grouped: bool = False) -> list[Consumer]:
    """The conv (groups=1, not transposed) and linear layers of a torch-pruning group that lose input channels;
    ``grouped=True`` adds grouped convs (``is_grouped``), which bias compensation handles and the criteria do not."""
    dg = group._DG
    names = names if names is not None else dg._module2name
    out: dict[str, Consumer] = {}
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, LAYERS) or dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and (m.transposed or (m.groups != 1
                                                                       and not (grouped and is_grouped(m)))):
            continue
        name = names.get(m, type(m).__name__)
        root = getattr(item, "root_idxs", None) or list(item.idxs)
        c = out.setdefault(name, Consumer(name, m, [], []))
        c.idxs += [int(i) for i in item.idxs]
        c.root_idxs += [int(r) for r in root]
    return list(out.values())


# --------------------------------------------------------------------------------------------- collection
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
    names, points = list(dict.fromkeys(layer_names)), dict(points or {})
    modules = dict(model.named_modules())
    for n in [*names, *points]:
        if not isinstance(modules.get(n), LAYERS):
            what = "not a conv/linear layer" if n in modules else "not a module of the model"
            near = closest(n, [k for k, m in modules.items() if isinstance(m, LAYERS)])
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise PruningError(f"channel statistics: {n!r} is {what}{hint}")
    batches = iter(calib_data)
    first = next(batches, None)
    if first is None:
        raise PruningError("collecting channel statistics got no calibration batches")
    x0 = to_device(split_batch(first)[0], device)

    finder = None
    if inputs or any(n not in points for n in names):
        dg = getattr(graph, "DG", graph)
        dg = _trace(model, x0) if dg is None else dg
        finder = _Finder(model, dg)
    accs: dict[tuple, tuple[_Point, _Accumulator]] = {}

    def register(p: _Point, channels: int, cov: bool) -> _Accumulator:
        if p.module not in modules:
            raise PruningError(f"channel statistics: point module {p.module!r} is not a module of the model")
        if p.key in accs:
            acc = accs[p.key][1]
            if acc.channels != channels:
                raise PruningError(f"{p.describe()} is measured as {acc.channels} and {channels} channels")
            if cov and not acc.covariance:
                acc.enable_covariance()
            return acc
        accs[p.key] = (p, _Accumulator(channels, cov, p.describe()))
        return accs[p.key][1]

    producer, consumer = {}, {}
    for n in names:
        p = _override(n, points[n], modules) if n in points else finder.point(n)
        producer[n] = register(p, channels_out(modules[n]), False)
        if inputs:
            for c in finder.consumers(n):
                m = modules[c]
                cov = covariance and channels_in(m) <= MAX_COV_FEATURES and lstsq_supported(m)
                consumer[c] = register(_Point(c, "input", _dim_of(m)), channels_in(m), cov)
                if covariance and patch_supported(m):
                    consumer[c + PATCHES] = register(_patch_point(c, m), patch_features(m), True)
    log.debug("statistics at %d points for %d layers", len(accs), len(names))

    state: dict[str, torch.Tensor | None] = {"mask": None}
    handles = [_hook(modules[p.module], p, acc, state) for p, acc in accs.values()]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in itertools.chain([first], batches):
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
    idle = [p.describe() for p, acc in accs.values() if acc.count == 0]
    if idle:
        raise PruningError(f"no activations were seen at {idle[0]} (is that module called in forward?)")
    results = {k: acc.result() for k, (_, acc) in accs.items()}
    by_acc = {id(acc): results[k] for k, (_, acc) in accs.items()}
    log.info("channel statistics of %d layers from %d batches (%d points)", len(names), n_batches, len(accs))
    return StatsDict({n: by_acc[id(a)] for n, a in producer.items()},
                     inputs={c: by_acc[id(a)] for c, a in consumer.items()})


def lstsq_supported(m: nn.Module) -> bool:
    """Linear layers and 1x1 convs (groups=1, no padding): every output is an affine map of one input position."""
    if isinstance(m, nn.Linear):
        return True
    if not isinstance(m, nn.modules.conv._ConvNd) or m.groups != 1 or any(k != 1 for k in m.kernel_size):
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


def _override(layer: str, spec: str | Callable, modules: dict[str, nn.Module]) -> _Point:
    if callable(spec):
        return _Point(layer, "output", _dim_of(modules[layer]), ((getattr(spec, "__name__", "fn"), spec),))
    name, _, side = str(spec).partition(":")
    if name not in modules or side not in ("", "input", "output"):
        raise PruningError(f"points[{layer!r}] = {spec!r}: expected 'module', 'module:input' or a callable; "
                           f"{name!r} is " + ("a module" if name in modules else "not a module of the model"))
    return _Point(name, side or "output", _dim_of(modules[name]))


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


def _head(x: Any, n: int = 2) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 else x
    if isinstance(x, dict):
        return {k: _head(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_head(v, n) for v in x)
    return x


def _trace(model: nn.Module, x: Any) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), deep_shape_inference():
            return tp.DependencyGraph().build_dependency(model, example_inputs=_head(x), verbose=False,
                                                         forward_fn=call_model)
    except Exception as e:  # tracing failures come in every type
        raise PruningError(f"torch-pruning could not trace {type(model).__name__} to find where channel statistics "
                           f"are measured ({type(e).__name__}: {e}); pass points={{layer: module}}") from e
    finally:
        model.train(was_training)


def sync_stats(stats: StatsDict) -> StatsDict:
    """Merge the statistics of all ranks (in place) when ``torch.distributed`` is initialised, so that every rank
    prunes the same channels. Every rank must hold the same layers; ranks are merged in rank order (identical
    floating-point result everywhere). A no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    uniq: dict[int, ChannelStats] = {}
    for s in [*(stats[k] for k in sorted(stats)), *(stats.inputs[k] for k in sorted(getattr(stats, "inputs", {})))]:
        uniq.setdefault(id(s), s)
    items = list(uniq.values())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flat = _pack(items).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    parts = [_unpack(g.cpu(), items) for g in gathered]
    for i, s in enumerate(items):
        merged = parts[0][i]
        for rank in parts[1:]:
            merged = merged.merge(rank[i])
        s.mean, s.var, s.count, s.cov, s.halves = merged.mean, merged.var, merged.count, merged.cov, merged.halves
    return stats


def _pack(items: list[ChannelStats]) -> torch.Tensor:
    """One float64 vector: per entry [count, mean, var, cov (when present), its halves (when present)]."""
    parts = []
    for s in items:
        parts += [torch.tensor([float(s.count)], dtype=torch.float64), s.mean.double().cpu(), s.var.double().cpu()]
        if s.cov is not None:
            parts.append(s.cov.double().cpu().reshape(-1))
        if s.halves is not None:
            parts.append(_pack(list(s.halves)))
    return torch.cat(parts)


def _unpack(flat: torch.Tensor, like: list[ChannelStats]) -> list[ChannelStats]:
    out, o = [], 0
    for s in like:
        c = s.channels
        count, mean, var = int(flat[o].item()), flat[o + 1:o + 1 + c], flat[o + 1 + c:o + 1 + 2 * c]
        o += 1 + 2 * c
        cov = halves = None
        if s.cov is not None:
            cov, o = flat[o:o + c * c].view(c, c), o + c * c
        if s.halves is not None:
            n = _pack(list(s.halves)).numel()
            halves, o = tuple(_unpack(flat[o:o + n], list(s.halves))), o + n
        out.append(ChannelStats(mean, var, count, cov, s.point, halves))
    return out
