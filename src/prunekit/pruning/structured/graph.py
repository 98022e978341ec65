"""The model as torch-pruning sees it: its dependency graph, named layers, and the prunable units (groups).


A *unit* is one torch-pruning group (coupled layers whose channels go together) that the engine may shrink:
its channels are scored once, then a selection decides how many of its elements (channels, or whole attention
heads) to remove.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit.errors import PruningError
from prunekit.models.prunable import make_prunable
from prunekit.pruning.structured.detect import make_yolo_prunable
from prunekit.pruning.structured.heads import Attention, find_attention

# the regex matching and the torch-pruning guards live in their own modules; their names stay importable from here
from prunekit.pruning.structured.layer_patterns import (  # noqa: F401
    _ancestors,
    first_override,
    match_layers,
    matches,
    no_match_message,
)
from prunekit.pruning.structured.tp_guards import (  # noqa: F401
    _empties,
    _GroupTooLarge,
    deadline,
    describe_inputs,
    index_budget,
    sync_split_offsets,
)
from prunekit.pruning.structured.trace import CUSTOMIZED_PRUNERS, channel_trace_forms, link_permutations
from prunekit.pruning.structured.tv_detect import make_tv_detection_prunable

log = logging.getLogger(__name__)

# layers whose output channels root a group (torch-pruning's default minus LSTM)
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(eq=False)
class Unit:
    """One prunable group, named after its root layer."""

    name: str
    module: nn.Module
    channels: int  # output channels of the root layer
    layers: list[str]  # conv/linear layers whose output channels this group removes
    consumers: list[str]  # conv/linear layers whose input channels this group removes
    ch_groups: int = 1  # channels form ch_groups equal blocks pruned alike (grouped convs, GroupNorm)
    multiple_of: int = 1  # kept channels must be a multiple of this (nn.MultiheadAttention's num_heads)
    attention: Attention | None = None  # set: whole heads are the elements
    group: Any = field(default=None, repr=False)  # the full torch-pruning group (all channels), for scoring
    max_ratio: float | None = None  # this unit's own cap (``ratio_caps``), below the global ``max_ratio``

    @property
    def size(self) -> int:
        """Number of selectable elements: heads, or channels per channel block."""
        return self.attention.num_heads if self.attention else self.channels // self.ch_groups

    def element_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-channel scores -> per-element scores (mean over channel blocks, or over a head's dims)."""
        if self.attention is not None:
            heads, hd = self.attention.num_heads, self.attention.head_dim
            return scores.view(-1, heads, hd).mean(dim=(0, 2))  # (S, H, hd) -> (H,)
        if self.ch_groups > 1:
            return scores.view(self.ch_groups, -1).mean(dim=0)  # (G, C/G) -> (C/G,)
        return scores

    def channel_indices(self, elements: Iterable[int]) -> list[int]:
        """Element indices -> root channel indices to remove."""
        elements = sorted(int(e) for e in elements)
        if self.attention is not None:
            heads, hd = self.attention.num_heads, self.attention.head_dim
            blocks = self.channels // (heads * hd)  # 3 for a fused qkv, 1 for a single projection
            return [s * heads * hd + h * hd + d for s in range(blocks) for h in elements for d in range(hd)]
        gs = self.size
        return [e + g * gs for g in range(self.ch_groups) for e in elements]


# torch-pruning 1.6's group search runs away on a few graphs: on Swin's window reshapes and MaxViT its index mapping
# multiplies the index lists at every pass through a reshape; on ReXNet's partial residuals it adds small
# dependencies forever (each add scanning the whole group). A root's group is abandoned once it holds more index
# entries or dependencies than its budget (deterministic: the same roots on every machine and every rank), or takes
# longer than GROUP_ROOT_TIMEOUT_S (a last resort).
GROUP_INDEX_BUDGET = 1_000_000  # index entries: the floor of PruningGraph.group_budget()
GROUP_DEPENDENCY_BUDGET = 5_000  # dependencies added: the floor
GROUP_ROOT_TIMEOUT_S = 120


# torch-pruning's channel inference gives up after this many recursive calls in all (its default, 500, is too few
# where residual adds or dense concats multiply the paths back from a concat: torchvision's Swin-S/B and timm's
# DPN fail to trace with it; DPN-68 needs about 20 000, which take 0.4 s)
SHAPE_INFERENCE_STEPS = 20_000
PYTHON_STACK = 10_000  # the calls nest no deeper than the graph is long


@contextmanager
def deep_shape_inference(steps: int | None = None) -> Iterator[None]:
    """Let torch-pruning's recursive channel inference make up to ``steps`` (default ``SHAPE_INFERENCE_STEPS``)
    calls, nested up to ``PYTHON_STACK`` deep, while a graph is traced; both limits are restored afterwards."""
    steps = SHAPE_INFERENCE_STEPS if steps is None else steps
    constants = tp.dependency.constants
    old_steps, old_stack = constants.MAX_RECURSION_DEPTH, sys.getrecursionlimit()
    constants.MAX_RECURSION_DEPTH = max(old_steps, steps)
    sys.setrecursionlimit(max(old_stack, PYTHON_STACK))
    try:
        yield
    finally:
        constants.MAX_RECURSION_DEPTH = old_steps
        sys.setrecursionlimit(old_stack)


# architectures torch-pruning 1.6 cannot trace, with the reason (checked before tracing, by class name). ShuffleNetV2
# and torchvision Swin are traced through their prunable forms (prunekit.models.prunable, .trace) instead.
UNSUPPORTED: dict[str, str] = {}


class PruningGraph:
    """torch-pruning's ``DependencyGraph`` of ``model`` plus names, outputs, stems and attention modules.

    The model is traced in eval mode (so BatchNorm running statistics are untouched) and its mode restored.
    """

    def __init__(self, model: nn.Module, example_inputs: Any):
        self.model = model
        why = UNSUPPORTED.get(type(model).__name__)
        if why:
            raise PruningError(f"{type(model).__name__} cannot be pruned structurally: {why}")
        swapped = make_prunable(model)  # torchvision Swin / ShuffleNetV2: forms whose forward survives pruning
        swapped += make_yolo_prunable(model)  # Ultralytics C2f / C3k2 / C2PSA / PSA, Detect heads (detect.py)
        make_tv_detection_prunable(model)  # torchvision detectors: traced through their heads' raw outputs
        if swapped:
            log.info("%s: %d module(s) switched to prunekit's prunable forms (same outputs; see "
                     "prunekit.models.prunable)", type(model).__name__, swapped)
        was_training = model.training
        model.eval()
        try:
            # torch-pruning traces through autograd; modules with a channel_trace are traced through it
            with torch.enable_grad(), deep_shape_inference(), channel_trace_forms(model):
                self.DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                                customized_pruners=dict(CUSTOMIZED_PRUNERS))
            link_permutations(self.DG)
        except PruningError:
            raise
        except Exception as e:  # tracing failures come in every type
            raise PruningError(f"torch-pruning could not trace {type(model).__name__} on example_inputs "
                               f"{describe_inputs(example_inputs)}: {type(e).__name__}: {e} (example_inputs must be "
                               "what the model's forward takes: a tensor, a tuple of positional inputs or a dict of "
                               "keyword inputs)") from e
        finally:
            model.train(was_training)
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.attention: list[Attention] = find_attention(model)
        self.left_whole: dict[str, str] = {}  # root -> why torch-pruning's group of it is not pruned (see groups())
        self.layers: list[str] = [n for n, m in self.modules.items()
                                  if isinstance(m, ROOT_TYPES) and m in self.DG.module2node]

    def name(self, module: Any) -> str | None:
        return self.DG._module2name.get(module) if isinstance(module, nn.Module) else None

    def output_modules(self) -> list[nn.Module]:
        """Modules whose output is a model output (terminal graph nodes): their output channels stay."""
        return [n.module for n in self.DG.module2node.values() if not n.outputs and isinstance(n.module, nn.Module)]

    def stem_layers(self) -> set[str]:
        """Conv/linear layers that read the model input directly."""
        return {name for name in self.layers if not self.DG.module2node[self.modules[name]].inputs}

    def projections(self) -> dict[str, Attention]:
        """Head-carrying projection layer name -> its attention module."""
        return {p: a for a in self.attention for p in a.projections}

    def groups(self, ignored: Iterable[str] = ()) -> list[Any]:
        """All torch-pruning groups whose root is a conv/linear layer, skipping ``ignored`` layers as roots and
        every group that would prune the output channels of a model output.

        The same walk as torch-pruning's ``get_all_groups``, one root at a time under a budget: torch-pruning
        1.6's index mapping runs away on a few graphs (see ``GROUP_INDEX_BUDGET``). A root whose group grows past
        ``group_budget()`` (or takes longer than ``GROUP_ROOT_TIMEOUT_S``) is left unpruned with a
        warning (its layers keep their output channels); the rest of the model is still pruned.
        """
        dg = self.DG
        ignored_modules = [self.modules[n] for n in ignored] + self.output_modules()
        ignored_ids = {id(m) for m in [*ignored_modules, *dg.IGNORED_LAYERS_IN_TRACING]}
        visited: set[int] = set()
        groups, stuck, out_of_range = [], [], []
        entries, dependencies = self.group_budget()
        with index_budget(entries, dependencies) as used:
            for m in list(dg.module2node):
                if id(m) in ignored_ids or id(m) in visited or not isinstance(m, ROOT_TYPES):
                    continue
                used[:] = [0, 0]
                group = self._root_group(m, stuck)
                if group is None:
                    visited.add(id(m))
                    continue
                if not self._in_range(group):
                    out_of_range.append(self.name(m) or type(m).__name__)
                    visited.add(id(m))
                    continue
                prunable = True
                for dep, _ in group:
                    if dg.is_out_channel_pruning_fn(dep.handler):
                        visited.add(id(dep.target.module))
                        prunable = prunable and id(dep.target.module) not in ignored_ids
                if prunable:
                    groups.append(group)
        if stuck:
            log.warning("torch-pruning could not build the dependency group of %d layer(s) of %s (past %d index "
                        "entries, %d dependencies or %d s: a runaway of its group search); they keep their output "
                        "channels: %s", len(stuck), type(self.model).__name__, entries, dependencies,
                        GROUP_ROOT_TIMEOUT_S, ", ".join(stuck))
        if out_of_range:
            log.warning("torch-pruning mapped the channels of %d group(s) of %s past the size of one of their layers "
                        "(an inconsistent index mapping); they keep their output channels: %s", len(out_of_range),
                        type(self.model).__name__, ", ".join(out_of_range))
        self.left_whole = {**dict.fromkeys(stuck, "runaway group search"),
                           **dict.fromkeys(out_of_range, "indices past a layer's size")}
        return groups

    def _in_range(self, group: Any) -> bool:
        """Every index of ``group`` fits the layer it prunes (out- or in-channels); torch-pruning's mapping is
        inconsistent on a few graphs (ReXNet's partial residuals) and would index past a weight's end."""
        dg = self.DG
        for dep, idxs in group:
            m = dep.target.module
            pruner = dg.get_pruner_of_module(m) if isinstance(m, nn.Module) else None
            if pruner is None or not idxs:
                continue
            size = pruner.get_out_channels(m) if dg.is_out_channel_pruning_fn(dep.handler) else \
                pruner.get_in_channels(m)
            if size is not None and max(int(i) for i in idxs) >= size:
                return False
        return True

    def group_budget(self) -> tuple[int, int]:
        """(index entries, dependencies) one group may add: ``GROUP_INDEX_BUDGET`` or 8 per channel (in and out) of
        the model's conv, linear and norm layers; ``GROUP_DEPENDENCY_BUDGET`` or 10 per graph node; whichever is
        more. A real group lists each of its layers a few times at most: Swin-T's largest holds 290 000 entries
        (3.3 per channel of the model) and 2 500 dependencies (3 per node); its runaway ones pass 1 M entries
        within about a second."""
        channels = 0
        for m in self.modules.values():
            if isinstance(m, ROOT_TYPES):
                channels += sum(int(getattr(m, k, 0) or 0) for k in
                                ("in_channels", "out_channels", "in_features", "out_features"))
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                channels += next((p.numel() for p in m.parameters(recurse=False)), 0)
        return max(GROUP_INDEX_BUDGET, 8 * channels), max(GROUP_DEPENDENCY_BUDGET, 10 * len(self.DG.module2node))

    def _root_group(self, m: nn.Module, stuck: list[str]) -> Any:
        """The whole group of root ``m``; ``None`` when ``m`` prunes nothing, or when torch-pruning's search ran
        past the budget or the deadline (then ``m`` is appended to ``stuck``)."""
        dg = self.DG
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            return None
        name = self.name(m) or type(m).__name__
        try:
            with deadline(GROUP_ROOT_TIMEOUT_S, name):
                return dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except (_GroupTooLarge, PruningError):
            stuck.append(name)
            return None
        except Exception as e:
            raise PruningError(f"torch-pruning could not group the layers of {type(self.model).__name__} "
                               f"(group of {name!r}): {type(e).__name__}: {e}") from e

    def members(self, group: Any) -> tuple[list[str], list[str]]:
        """(conv/linear layers pruned on the output side, those pruned on the input side) of a group."""
        outs, ins = [], []
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, ROOT_TYPES):
                name = self.name(m)
                side = outs if self.DG.is_out_channel_pruning_fn(dep.handler) else ins
                if name is not None and name not in side:
                    side.append(name)
        return outs, ins

    def make_unit(self, group: Any, heads: dict[str, Attention]) -> Unit:
        root = group[0].dep.target.module
        outs, ins = self.members(group)
        ch_groups, multiple = 1, 1
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, nn.Module):
                continue
            if isinstance(m, nn.MultiheadAttention):
                multiple = math.lcm(multiple, m.num_heads)
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
                continue  # depthwise: pruned channel by channel
            pruner = self.DG.get_pruner_of_module(m)
            if pruner is None:
                continue
            out_side = self.DG.is_out_channel_pruning_fn(dep.handler)
            g = pruner.get_out_channel_groups(m) if out_side else pruner.get_in_channel_groups(m)
            ch_groups = max(ch_groups, int(g or 1))
        attn = None
        for name in outs:
            if name in heads:
                attn = heads[name]
        return Unit(name=self.name(root), module=root, channels=len(group[0].idxs), layers=outs, consumers=ins,
                    ch_groups=ch_groups, multiple_of=multiple, attention=attn, group=group)

    def pruning_group(self, unit: Unit, channels: list[int]) -> Any:
        """The group that removes ``channels`` of ``unit``'s root layer (built now, on the current model)."""
        module = self.modules[unit.name]
        pruner = self.DG.get_pruner_of_module(module)
        sync_split_offsets(self.DG)
        return self.DG.get_pruning_group(module, pruner.prune_out_channels, channels)

    def checked_group(self, unit: Unit, channels: list[int]) -> tuple[Any, list[int]]:
        """``pruning_group`` of ``channels``, sparing root channels where the group would remove every remaining
        input or output channel of one of its layers. That happens where a layer's channels come from several
        groups (ShuffleNetV2: a conv reads channels of many earlier blocks through the shuffles), each group
        pruned on its own. Returns (group, channels removed); a unit of heads or channel blocks is not trimmed."""
        dg, spared = self.DG, []
        channels = list(channels)
        while True:
            group = self.pruning_group(unit, channels)
            if dg.check_pruning_group(group):
                break
            keep = None
            if unit.attention is None and unit.ch_groups == 1:
                keep = next((item.root_idxs[0] for item in group if item.root_idxs and _empties(dg, item)), None)
            if keep is None or keep not in channels or len(channels) <= 1:
                raise PruningError(f"removing {len(channels)} channels of {unit.name!r} would empty a layer of its "
                                   "group")
            channels.remove(keep)
            spared.append(keep)
        if spared:
            log.warning("%s: %d channel(s) kept that the selection removed, so that no layer of its group loses all "
                        "its channels (its layers also read channels of other groups)", unit.name, len(spared))
        return group, channels


def copy_graph(graph: PruningGraph, meta: bool = False) -> PruningGraph:
    """A deep copy of the model together with its dependency graph (no re-tracing).

    The autograd nodes recorded while tracing and torch-pruning's pruner objects are shared, not copied (pruning
    functions are compared by identity); modules and graph nodes are copied in one pass, so the copied graph
    points at the copied modules. With ``meta=True`` every parameter and buffer is copied to the meta device
    (shapes only, no memory): enough to prune the copy and count its MACs or check its output shapes.
    """
    import copy

    dg = graph.DG
    shared: list[Any] = [n.grad_fn for n in dg.module2node.values() if n.grad_fn is not None]
    shared += [dg.ops, *dg.REGISTERED_PRUNERS.values(), *dg.CUSTOMIZED_PRUNERS.values()]
    shared += [v for v in vars(tp.pruner.function).values() if isinstance(v, tp.pruner.function.BasePruningFunc)]
    shared += [f for n in dg.module2node.values() for d in n.dependencies for f in (d.trigger, d.handler)]
    memo: dict[int, Any] = {id(x): x for x in shared if x is not None}
    if meta:
        for p in graph.model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for b in graph.model.buffers():
            memo[id(b)] = b.detach().to("meta")
    model = copy.deepcopy(graph.model, memo)
    # graph nodes link to each other in long chains: register an empty copy of every node first, so copying one
    # node's links finds its neighbours in the memo instead of recursing along the whole graph
    nodes = list(dg.module2node.values())
    blanks = [object.__new__(type(n)) for n in nodes]
    memo.update((id(n), b) for n, b in zip(nodes, blanks))
    for n, b in zip(nodes, blanks):
        b.__dict__.update(copy.deepcopy(n.__dict__, memo))
    dg = copy.deepcopy(dg, memo)
    g = PruningGraph.__new__(PruningGraph)
    g.model, g.DG = model, dg
    g.modules = dict(model.named_modules())
    g.attention = find_attention(model)
    g.layers = list(graph.layers)
    return g


def strip_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm by ``nn.Identity`` (in place). For meta copies only: BatchNorm keeps shapes and costs
    no MACs, but on the meta device it runs a slow Python decomposition."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return model
