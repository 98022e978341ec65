"""``PruneReport``: what a pruning call did, as data (JSON-ready) and as a few log lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GroupRecord:
    name: str  # root layer of the group
    layers: list[str]  # conv/linear layers that lost output channels
    consumers: list[str]  # conv/linear layers that lost input channels
    before: int  # root channels before
    after: int  # root channels after
    removed: list[int] = field(default_factory=list)  # root channel indices removed (before pruning)
    heads_before: int | None = None
    heads_after: int | None = None


@dataclass
class PruneReport:
    """Returned by ``prunekit.prune``.

    Attributes:
        criterion, scope, ratio: what was asked (``ratio`` is the global ratio used, searched when
            ``target_macs`` was given).
        layers: conv/linear layer name -> ``[out_channels_before, out_channels_after]`` for every changed layer.
        groups: one record per pruned group.
        macs_before, macs_after, params_before, params_after: per-sample MACs and parameter counts.
        compensation: one dict per compensated consumer layer (empty without compensation).
        capped: groups held at ``max_ratio``.
        search: ``[(ratio, macs_kept_fraction), ...]`` tried by the ``target_macs`` search.
        allocation: ``scope="adaptive"``: group -> ``{"ratio": r, "trials": [[ratio, damage], ...]}``.
        left_whole: groups (by root layer) that torch-pruning could not prune safely, with the reason; they keep
            their channels (also said in a warning).
        bn_recalibration: ``{"layers": n, "batches": k}`` when BatchNorm statistics were re-estimated after
            pruning, ``{"skipped": why}`` when the model has BatchNorm and they were not (empty without BatchNorm).
        latency: with ``latency_backend`` / ``target_latency``: backend, threads, the latency table (path, entries
            timed / cached, seconds), predicted latency kept, and the paired check (dense / pruned medians,
            measured kept; see ``prunekit.pruning.structured.latency``).
    """

    criterion: str
    scope: str
    ratio: float
    target_macs: float | None = None
    preset: str | None = None
    heads: bool = False
    compensate: str = "none"  # the compensation used (compensate='auto' resolved)
    layers: dict[str, list[int]] = field(default_factory=dict)
    groups: list[GroupRecord] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    compensation: list[dict[str, Any]] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)
    search: list[tuple[float, float]] = field(default_factory=list)
    allocation: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_whole: dict[str, str] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    bn_recalibration: dict[str, Any] = field(default_factory=dict)
    reconstruction: list[dict[str, Any]] = field(default_factory=list)
    refit: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def groups_pruned(self) -> int:
        return len(self.groups)

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(groups_pruned=self.groups_pruned, macs_kept=self.macs_kept, params_kept=self.params_kept)
        return d

    def summary(self) -> str:
        lines = [f"pruned {self.groups_pruned} groups with {self.criterion} ({self.scope}, ratio {self.ratio:.4f}"
                 + (f", target_macs {self.target_macs}" if self.target_macs is not None else "") + ")",
                 f"MACs {self.macs_before / 1e6:.2f}M -> {self.macs_after / 1e6:.2f}M ({self.macs_kept:.1%} kept), "
                 f"params {self.params_before / 1e3:.1f}K -> {self.params_after / 1e3:.1f}K "
                 f"({self.params_kept:.1%} kept)"]
        if self.capped:
            lines.append(f"{len(self.capped)} groups held at max_ratio: {', '.join(self.capped[:6])}"
                         + (" ..." if len(self.capped) > 6 else ""))
        if self.left_whole:
            lines.append(f"{len(self.left_whole)} groups left whole (torch-pruning could not prune them safely): "
                         + ", ".join(list(self.left_whole)[:6]) + (" ..." if len(self.left_whole) > 6 else ""))
        if self.latency:
            la, spread = self.latency, self.latency.get("measured_kept_range")
            lines.append(f"latency ({la['backend']}, {la['threads']} threads): predicted {la['predicted_kept']:.1%} "
                         "kept" + (f", measured {la['measured_kept']:.1%} ({la['dense_ms']:.2f} -> "
                                   f"{la['pruned_ms']:.2f} ms, paired medians"
                                   + (f"; rounds {spread[0]:.1%}-{spread[1]:.1%}" if spread else "") + ")"
                                   if "measured_kept" in la else ""))
        if self.compensation:
            lines.append(f"{self.compensate} compensation applied to {len(self.compensation)} consumer layers")
        if "layers" in self.bn_recalibration:
            lines.append(f"BatchNorm recalibrated: {self.bn_recalibration['layers']} layers on "
                         f"{self.bn_recalibration['batches']} batches")
        elif "skipped" in self.bn_recalibration:
            lines.append(f"BatchNorm NOT recalibrated ({self.bn_recalibration['skipped']})")
        if self.refit:
            before, after = (sum(r[k] for r in self.refit) for k in ("error_before", "error_after"))
            lines.append(f"refitted {len(self.refit)} consumer layers in closed form (calibration error "
                         f"x{after / max(before, 1e-30):.2f})")
        if self.reconstruction:
            gained = [r for r in self.reconstruction if r["kept"] == "reconstructed"]
            ratios = [r["loss_after"] / r["loss_before"] for r in gained if r["loss_before"]]
            skipped = sum(r["kept"].startswith("skipped") for r in self.reconstruction)
            lines.append(f"reconstructed {len(gained)} of {len(self.reconstruction)} blocks"
                         + (f" (held-out error x{min(ratios):.2f}-{max(ratios):.2f})" if ratios else "")
                         + (f", {skipped} skipped (their outputs lost channels)" if skipped else ""))
        return "\n".join(lines)
