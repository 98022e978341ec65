"""Where a layer's channels are measured (its *point*, see :mod:`prunekit.pruning.structured.stats`), found on
torch-pruning's graph of the model, and the layers that consume a group's channels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunekit.batch import call_model
from prunekit.errors import PruningError
from prunekit.pruning.structured.graph import deep_shape_inference

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


def _counted(conv: nn.modules.conv._ConvNd, grouped: bool) -> bool:
    """Whether a conv reading pruned channels is a consumer: groups=1 and not transposed; with ``grouped``
    (compensation) also grouped convs and transposed convs of groups=1."""
    if conv.transposed:
        return grouped and conv.groups == 1
    return conv.groups == 1 or (grouped and is_grouped(conv))


def consumers(group: Any, names: Mapping[nn.Module, str] | None = None, grouped: bool = False) -> list[Consumer]:
    """The conv (groups=1, not transposed) and linear layers of a torch-pruning group that lose input channels;
    ``grouped=True`` adds grouped convs (``is_grouped``) and transposed convs (groups=1), which bias compensation
    handles and the criteria do not."""
    dg = group._DG
    names = names if names is not None else dg._module2name
    out: dict[str, Consumer] = {}
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, LAYERS) or dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and not _counted(m, grouped):
            continue
        name = names.get(m, type(m).__name__)
        root = getattr(item, "root_idxs", None) or list(item.idxs)
        c = out.setdefault(name, Consumer(name, m, [], []))
        c.idxs += [int(i) for i in item.idxs]
        c.root_idxs += [int(r) for r in root]
    return list(out.values())



def _override(layer: str, spec: str | Callable, modules: dict[str, nn.Module]) -> _Point:
    if callable(spec):
        return _Point(layer, "output", _dim_of(modules[layer]), ((getattr(spec, "__name__", "fn"), spec),))
    name, _, side = str(spec).partition(":")
    if name not in modules or side not in ("", "input", "output"):
        raise PruningError(f"points[{layer!r}] = {spec!r}: expected 'module', 'module:input' or a callable; "
                           f"{name!r} is " + ("a module" if name in modules else "not a module of the model"))
    return _Point(name, side or "output", _dim_of(modules[name]))

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


