"""``prunekit sensitivity --from DIR --criterion NAME --ratios 0.1,0.3,0.5,0.7,0.9``: per-group pruning sensitivity.

Prunes each prunable group alone at each ratio (no fine-tuning), evaluates on a fixed random subset of the
validation set, and writes ``sensitivity.json``, ``sensitivity.csv`` and ``sensitivity.png`` (top-1 vs ratio, one
curve per group) into ``--out`` (default: ``DIR/sensitivity/``, where ``prunekit report`` finds it).

Example::

    prunekit sensitivity --from runs/base --criterion l1 --ratios 0.1,0.3,0.5,0.7,0.9
    prunekit sensitivity --from runs/base --criterion taylor --val-samples 1000 --out runs/sens-taylor
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from prunekit.config import Config, section
from prunekit.data import DataArgs, get_dataset, make_loader
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pruning.structured.settings import Calibration
from prunekit.report.sensitivity import (
    CALIB_BATCHES,
    DEFAULT_RATIOS,
    check_ratios,
    layer_sensitivity,
    write_sensitivity,
)

log = logging.getLogger("prunekit.sensitivity")


class SensitivityConfig(Config):
    """``prunekit sensitivity``: how much top-1 each group loses when pruned alone (sections ``calibration``,
    ``data``)."""

    from_dir: Path = Field(alias="from", description="run directory of the trained model")
    criterion: str = Field("l1", description="channel scoring rule (prunekit.pruning.list_criteria())")
    ratios: list[float] = Field(list(DEFAULT_RATIOS), description="fractions of each group's channels removed")
    out: Path | None = Field(None, description="output folder (default: FROM/sensitivity)")
    val_samples: int = Field(512, gt=0, description="size of the fixed random validation subset evaluated")
    preset: str | None = Field(None, description="test only the groups of this preset (mlp-only, interior)")
    ignore: list[str] = Field(default_factory=list, description="regexes of module names never pruned")
    only: list[str] = Field(default_factory=list, description="regexes of module names: test only these groups")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    seed: int = Field(0, description="seed of the validation subset and of the random criterion")
    calibration: Calibration = section(Calibration, "calibration of each trial", batches=CALIB_BATCHES)
    data: DataArgs = section(DataArgs, "the data")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        return check_ratios(v)

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        from prunekit.pruning.structured.criteria import CRITERIA

        CRITERIA.get(v)
        return v


@register("sensitivity", SensitivityConfig, help="Prune each group alone at several ratios (no fine-tuning) and "
          "measure the top-1 lost: sensitivity.json, .csv, .png", writes_run=False)
def sensitivity_run(cfg: SensitivityConfig) -> tuple[dict[str, Any], Path]:
    """Load ``cfg.from_dir``, measure every group's sensitivity, write the three files. Returns (result, folder)."""
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.from_dir) / "sensitivity"
    with stage_run(cfg, "sensitivity", writes_run=False) as run:  # its folder is not a run directory
        data, model = run.data, run.model
        val_ds = get_dataset(data["dataset"], "val", data_dir=data["data_dir"], image_size=data["image_size"],
                             download=cfg.data.download)
        n = min(cfg.val_samples, len(val_ds))
        # a fixed random subset: the first N of a class-sorted folder would hold a single class
        idx = torch.randperm(len(val_ds), generator=torch.Generator().manual_seed(cfg.seed))[:n].sort().values
        val = list(make_loader(torch.utils.data.Subset(val_ds, idx.tolist()), cfg.data.batch_size,
                               workers=cfg.data.workers))
        calib = make_loader(get_dataset(data["dataset"], "calib", data_dir=data["data_dir"],
                                        image_size=data["image_size"], download=cfg.data.download),
                            cfg.data.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.data.workers)
        log.info("sensitivity: %s from %s on %d %s validation samples, ratios %s", run.spec.name,
                 cfg.from_dir, n, data["dataset"], ", ".join(f"{r:g}" for r in cfg.ratios))
        res = layer_sensitivity(model, run.example_inputs(), val, criterion=cfg.criterion, ratios=cfg.ratios,
                                calib_data=calib, calib_batches=cfg.calibration.batches,
                                recalibrate_bn=cfg.calibration.recalibrate_bn is not False,
                                preset=cfg.preset, ignore=cfg.ignore, only=cfg.only, device=run.device,
                                seed=cfg.seed)
    res = {"from": str(cfg.from_dir), "model": run.spec.name, **data, **res}
    write_sensitivity(res, out)
    return res, out
