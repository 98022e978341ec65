"""The ``sparse`` recipe stage: sparse pre-training of a run's model before structured pruning."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from prunekit import runs
from prunekit.config import Config, section
from prunekit.data import DataArgs
from prunekit.pipeline.commands import register
from prunekit.pipeline.skeleton import stage_run
from prunekit.pipeline.stages import loaders, model_metrics, test_metrics, val_metrics, write_run
from prunekit.pruning.sparse_train import SparseSettings, make_sparse_training
from prunekit.train import TrainSettings, fit
from prunekit.train.loop import default_loss

log = logging.getLogger(__name__)
_GMP = {"sparsity": "sparsity", "gmp_start": "start", "gmp_end": "end", "gmp_every": "every", "scope": "scope",
        "max_ratio": "max_ratio", "round_to": "round_to"}


class SparseConfig(Config):
    """``sparse`` recipe stage: train with a sparsity regulariser so that pruning removes less that matters
    (sections ``sparse``, ``train``, ``data``)."""

    from_dir: Path = Field(alias="from", description="run directory of the model to train")
    resume: bool = Field(False, description="continue an interrupted run in --out from its last checkpoint")
    out: Path = Field(Path("runs/sparse"), description="output run directory")
    overwrite: bool = Field(False, description="replace --out if it already holds a run")
    sparse: SparseSettings = section(SparseSettings, "the sparsity regulariser")
    train: TrainSettings = section(TrainSettings, "the sparse pre-training", epochs=5, lr=0.01)
    data: DataArgs = section(DataArgs, "the data")


@register("sparse-train", SparseConfig, help="Sparse pre-training before pruning: l1_group, bn_l1, gmp, "
          "variance_concentration", stage="sparse", trains=True)
def sparse(cfg: SparseConfig) -> dict[str, Any]:
    """Sparse pre-training from ``cfg.from_dir``; writes a run directory and returns its metrics."""
    sp, t, d = cfg.sparse, cfg.train, cfg.data
    with stage_run(cfg, "sparse", resumable=True) as run:
        out, data, model, spec = run.out, run.data, run.model, run.spec
        ld = loaders(data, d.batch_size, t.seed, d.workers, d.download)
        options: dict[str, Any] = {k: getattr(sp, k) for k in ("preset", "only", "ignore")}
        if sp.method == "gmp":
            options.update({v: getattr(sp, k) for k, v in _GMP.items() if getattr(sp, k) is not None})
        st = make_sparse_training(model, sp.method, sp.lam, runs.example_inputs(spec, 2, t.device),
                                  total_steps=t.epochs * len(ld["train"]), base_loss=default_loss(t), **options)
        log.info("sparse: %s (lam %s) on %s for %d epochs", sp.method, sp.lam, cfg.from_dir, t.epochs)
        t0 = time.perf_counter()
        loss_fn, callbacks = st
        best = fit(model, ld["train"], ld["val"], t, run_dir=out, resume=cfg.resume, phase="sparse",
                   loss_fn=loss_fn, callbacks=callbacks)
        extra = st.finalize()
        metrics = {**test_metrics(model, ld["test"], t.device), **val_metrics(best),
                   **model_metrics(model, spec, t.device), **extra,
                   "best_epoch": best.get("epoch"), "train_seconds": round(time.perf_counter() - t0, 2),
                   "stage": "sparse", "method": sp.method, "from": str(cfg.from_dir), **data}
        write_run(out, model, {**cfg.to_dict(), **data}, metrics, spec)
    return metrics
