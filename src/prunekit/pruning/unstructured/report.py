"""Honest figures for a sparsified model: sparsity per layer and overall, non-zero parameters, storage dense vs
sparse, and MACs with what they do and do not mean.

Storage is the exact byte count of each encoding of the sparsified layers' weights (everything else stays dense):

* dense:   ``numel * itemsize``
* CSR:     ``nnz * itemsize`` values + ``nnz`` column indices (uint16 when the row length fits, else int32)
           + ``rows + 1`` int32 row pointers; rows = output units, columns = fan-in
* bitmask: ``nnz * itemsize`` values + one bit per weight
* N:M:     the ``N/M`` kept values + ``ceil(log2 M)`` bits of position per kept value (NVIDIA's 2:4 layout: 2 bits)

MACs: ``macs`` are the dense MACs of the model, which unstructured sparsity does not change (dense kernels multiply
the zeros). ``macs_nonzero`` counts only multiplications by non-zero weights: what a kernel that skips every zero
could reach, a bound and not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.measure.macs import count_macs, count_params
from prunekit.pruning.unstructured.layers import gemm_weight
from prunekit.pruning.unstructured.masks import MASK
from prunekit.pruning.unstructured.patterns import nm_violations

DENSE_NOTE = ("Unstructured sparsity does not reduce dense FLOPs or latency: the zeros are stored in dense tensors and "
              "dense kernels multiply them. 'macs' is the dense count (unchanged); 'macs_nonzero' counts only the "
              "multiplications by non-zero weights, a bound that needs sparse kernels, which are not used here.")


@dataclass
class LayerSparsity:
    name: str
    type: str
    shape: list[int]
    params: int
    zeros: int
    sparsity: float
    structure: str
    macs: int | None = None
    macs_nonzero: int | None = None
    nm_violations: int | None = None  # groups breaking N:M (nm layers only; 0 = the pattern holds everywhere)
    patterns: list[Any] | None = None  # intra-kernel: the chosen patterns (0/1 grids)


@dataclass
class SparsityReport:
    """What ``sparsify`` / ``Sparsifier.report`` returns; ``to_dict()`` is ``sparsity_report.json``."""

    method: str
    target: float | None
    structure: str
    layers: list[LayerSparsity]
    skipped: dict[str, str]
    sparsity: float  # zeros / weights over the sparsified layers
    params: int  # every parameter of the model
    nonzero_params: int
    model_sparsity: float  # zeros / params over the whole model
    macs: int | None
    macs_nonzero: int | None
    storage: dict[str, int]
    notes: list[str] = field(default_factory=list)
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, Any]:
        """The flat figures that go into ``metrics.json``."""
        return {"sparsity": self.sparsity, "model_sparsity": self.model_sparsity, "params": self.params,
                "nonzero_params": self.nonzero_params, "macs": self.macs, "macs_nonzero": self.macs_nonzero,
                "sparsified_layers": len(self.layers), **{f"size_{k}": v for k, v in self.storage.items()},
                "method": self.method, "target_sparsity": self.target}

    def table(self) -> str:
        """A plain-text per-layer table plus the totals and notes."""
        rows = [f"{'layer':<34} {'shape':<18} {'params':>9} {'sparsity':>9} {'structure':>10}"]
        for lr in self.layers:
            rows.append(f"{lr.name:<34} {'x'.join(map(str, lr.shape)):<18} {lr.params:>9} {lr.sparsity:>9.4f} "
                        f"{lr.structure:>10}")
        for name, why in self.skipped.items():
            rows.append(f"{name:<34} {'(dense)':<18} {'':>9} {'':>9}   {why}")
        mb = 1 / 2**20
        st = self.storage
        rows += ["",
                 f"sparsity {self.sparsity:.4f} over {len(self.layers)} layers; whole model {self.model_sparsity:.4f}"
                 f" ({self.nonzero_params:,} of {self.params:,} parameters non-zero)",
                 "storage: " + ", ".join(f"{k} {v * mb:.3f} MiB" for k, v in st.items())]
        if self.macs is not None:
            rows.append(f"MACs: {self.macs / 1e6:.2f} M dense (unchanged); {self.macs_nonzero / 1e6:.2f} M by non-zero "
                        "weights (needs sparse kernels)")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- storage
def _index_bytes(cols: int) -> int:
    return 2 if cols <= 2**16 else 4


def layer_storage(weight: torch.Tensor, nm: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes of one weight in each encoding (see the module docstring)."""
    item = weight.element_size()
    numel = weight.numel()
    nnz = int((weight != 0).sum())
    rows = weight.shape[0]
    cols = numel // max(1, rows)
    out = {"dense": numel * item,
           "csr": nnz * (item + _index_bytes(cols)) + (rows + 1) * 4,
           "bitmask": nnz * item + math.ceil(numel / 8)}
    if nm is not None:
        n, m = nm
        kept = math.ceil(numel * n / m)
        out["nm"] = kept * item + math.ceil(kept * math.ceil(math.log2(m)) / 8)
    return out


def _dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's state without the masks (parameters and buffers, tied tensors once)."""
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(MASK) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------- build
@torch.no_grad()
def build_report(sp: Any, example_inputs: Any = None) -> SparsityReport:
    """The report of a ``Sparsifier`` ``sp`` (its model, layers, settings and selection)."""
    model, s = sp.model, sp.settings
    nm = s.nm_pair if s.structure == "nm" else None
    label = {"element": "unstruct.", "nm": s.nm, "kernel": "kernel", "pattern": f"pattern{s.pattern_keep}"}
    layers, dense_total = [], _dense_bytes(model)
    storage = {"dense": dense_total, "csr": dense_total, "bitmask": dense_total}
    if nm:
        storage["nm"] = dense_total
    for name, m in sp.layers.items():
        w = m.weight.detach()
        zeros = int((w == 0).sum())
        macs = sp.selection.macs.get(name)
        row = LayerSparsity(name=name, type=type(m).__name__, shape=list(w.shape), params=w.numel(), zeros=zeros,
                            sparsity=zeros / w.numel(), structure=label[s.structure], macs=macs,
                            macs_nonzero=None if macs is None else round(macs * (1 - zeros / w.numel())))
        if nm:
            row.nm_violations = nm_violations(gemm_weight(m).detach(), *nm)
        if name in sp.patterns:
            row.patterns = sp.patterns[name].grids()
        layers.append(row)
        enc = layer_storage(w, nm)
        for k in storage:  # replace this weight's dense bytes by its encoded bytes
            storage[k] += enc[k] - enc["dense"]
    weights = sum(lr.params for lr in layers)
    params = count_params(model)
    zeros_all = sum(int((p == 0).sum()) for p in {id(p): p for p in model.parameters()}.values())
    notes = [DENSE_NOTE]
    macs = macs_nonzero = None
    if example_inputs is not None:
        macs = count_macs(model, example_inputs)
        cut = sum(lr.macs - lr.macs_nonzero for lr in layers if lr.macs is not None)
        macs_nonzero = macs - cut
    if nm and any(lr.nm_violations for lr in layers):
        notes.append(f"the {s.nm} pattern does not hold in every group of some layers (see nm_violations)")
    return SparsityReport(method=s.method, target=sp.current, structure=s.structure, layers=layers,
                          skipped=dict(sp.selection.skipped), sparsity=sum(lr.zeros for lr in layers) / weights,
                          params=params, nonzero_params=params - zeros_all, model_sparsity=zeros_all / params,
                          macs=macs, macs_nonzero=macs_nonzero, storage=storage, notes=notes)
