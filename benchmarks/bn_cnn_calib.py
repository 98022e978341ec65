"""A BN CNN pruned through the Python API with calibration data, judged right after pruning (no fine-tuning).

What a new user does: ``prunekit.prune(model, x, criterion, target_macs=T, scope="global", calib_data=<a list of
un-augmented training batches>, compensate=...)`` on a trained ResNet-20 (Fashion-MNIST, full 60 000 images), then
evaluates top-1 on the test split. Each method runs over several calibration draws (``--seeds``: a different random
set of training images each), so the table gives the mean and the range, not the best run. torch-pruning's
MetaPruner (global L1, the ratio bisected to the same MACs) is the reference, with and without BatchNorm
recalibration on the same batches.

Optional ``--ft-epochs E``: the same plain SGD fine-tune (lr 0.01, cosine, momentum 0.9, no KD) after every method,
seed 0 only, to check that what is kept right after pruning is not paid for later.

    python benchmarks/bn_cnn_calib.py --baseline runs/fm60k_base
    python benchmarks/bn_cnn_calib.py --baseline runs/fm60k_base --targets 0.5 --methods variance+lstsq --ft-epochs 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit import runs
from prunekit.data import get_dataset
from prunekit.data.core import make_loader
from prunekit.measure import count_macs
from prunekit.pruning.structured.bn import recalibrate_bn
from prunekit.train.loop import evaluate

METHODS = {  # name -> prune() keyword arguments
    "l1": dict(criterion="l1"),
    "variance": dict(criterion="variance"),
    "variance+mean": dict(criterion="variance", compensate="mean"),
    "variance+lstsq": dict(criterion="variance", compensate="lstsq"),
    "variance_conditional+lstsq": dict(criterion="variance_conditional", compensate="lstsq"),
    "variance+mean-norecal": dict(criterion="variance", compensate="mean", recalibrate_bn=False),
}


def calib_batches(dataset: str, n: int, batch_size: int, seed: int, data_dir: str | None) -> list[Any]:
    """``n`` un-augmented training batches, a different random draw of images for every seed."""
    ds = get_dataset(dataset, "calib", data_dir=data_dir)
    loader = make_loader(ds, batch_size, shuffle=True, seed=1000 + seed, drop_last=True)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def tp_l1(model: nn.Module, x: torch.Tensor, keep: float) -> nn.Module:
    """torch-pruning MetaPruner, global L1, the ratio bisected until the MACs kept are within 1% of ``keep``."""
    import torch_pruning as tp

    m0 = count_macs(model, x)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(12):
        r = (lo + hi) / 2
        m = copy.deepcopy(model)
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        tp.pruner.MetaPruner(m, x, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=r, global_pruning=True,
                             ignored_layers=head).step()
        kept = count_macs(m, x) / m0
        if best is None or abs(kept - keep) < abs(best[1] - keep):
            best = (m, kept)
        if abs(kept - keep) <= 0.01:
            break
        lo, hi = (r, hi) if kept > keep else (lo, r)
    return best[0]


def finetune(model: nn.Module, train: Any, epochs: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * len(train)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        for i, (xb, yb) in enumerate(train):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
            if i % 100 == 0:
                logging.info("ft epoch %d/%d batch %d/%d (%.0f s)", ep + 1, epochs, i, len(train),
                             time.perf_counter() - t0)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="a trained run directory (prunekit train)")
    ap.add_argument("--targets", default="0.5,0.4", help="fractions of the MACs kept")
    ap.add_argument("--methods", default="tp-l1,tp-l1+recal,l1,variance,variance+mean,variance+lstsq,"
                    "variance_conditional+lstsq",
                    help=f"comma-separated: tp-l1, tp-l1+recal (torch-pruning, BN recalibrated), {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=3, help="calibration draws per method")
    ap.add_argument("--calib-batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--scope", default="global")
    ap.add_argument("--ft-epochs", type=int, default=0)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("prunekit", "torch_pruning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    dense = runs.load_model(a.baseline, "cpu").eval()
    cfg = runs.read_config(a.baseline)
    dataset, data_dir = cfg.get("dataset", "fashion-mnist"), cfg.get("data_dir")
    x = runs.example_inputs(dense.prunekit_spec, 1, "cpu")
    val = make_loader(get_dataset(dataset, "test", data_dir=data_dir), 500, shuffle=False, seed=0, drop_last=False)
    base = evaluate(dense, val, "cpu")["top1"]
    m0 = count_macs(dense, x)
    logging.info("dense %s: top-1 %.2f%%, %.2f M MACs", dense.prunekit_spec.name, base, m0 / 1e6)
    calibs = {s: calib_batches(dataset, a.calib_batches, a.batch_size, s, data_dir) for s in range(a.seeds)}
    rows: list[dict[str, Any]] = []
    for keep in (float(t) for t in a.targets.split(",")):
        for method in a.methods.split(","):
            for seed in range(a.seeds):
                m = copy.deepcopy(dense)
                t0 = time.perf_counter()
                if method.startswith("tp-l1"):
                    if seed:  # L1 does not read the data: one run (recalibration does)
                        if method == "tp-l1":
                            continue
                    m = tp_l1(m, x, keep)
                    if method.endswith("+recal"):
                        recalibrate_bn(m, calibs[seed], a.calib_batches)
                else:
                    prunekit.prune(m, x, target_macs=keep, scope=a.scope, calib_data=calibs[seed],
                                   calib_batches=a.calib_batches, **METHODS[method])
                secs = time.perf_counter() - t0
                top1 = evaluate(m.eval(), val, "cpu")["top1"]
                row = {"target_macs": keep, "method": method, "seed": seed, "macs_cut": 1 - count_macs(m, x) / m0,
                       "top1": top1, "seconds": round(secs, 1)}
                if a.ft_epochs and seed == 0:
                    train = make_loader(get_dataset(dataset, "train", data_dir=data_dir), a.batch_size,
                                        shuffle=True, seed=0, drop_last=True)
                    finetune(m, train, a.ft_epochs, a.ft_lr)
                    row["top1_ft"] = evaluate(m, val, "cpu")["top1"]
                rows.append(row)
                logging.info("%s", row)
    print(f"\ndense top-1 {base:.2f}%  ({dense.prunekit_spec.name}, {m0 / 1e6:.2f} M MACs), calibration "
          f"{a.calib_batches} x {a.batch_size} training images, {a.seeds} draws, scope {a.scope}\n")
    print("| target MACs kept | method | MACs cut | top-1 right after pruning (mean; min-max) | after fine-tune |")
    print("|---|---|---|---|---|")
    for keep in sorted({r["target_macs"] for r in rows}, reverse=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == method and r["target_macs"] == keep]
            if not rs:
                continue
            t = [r["top1"] for r in rs]
            ft = [r["top1_ft"] for r in rs if "top1_ft" in r]
            spread = f" ({min(t):.2f}-{max(t):.2f})" if len(t) > 1 else ""
            print(f"| {keep:.2f} | {method} | {100 * statistics.mean(r['macs_cut'] for r in rs):.1f}% | "
                  f"{statistics.mean(t):.2f}{spread} | {f'{ft[0]:.2f}' if ft else '-'} |")
    if a.json:
        a.json.write_text(json.dumps({"dense_top1": base, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
