"""Unstructured pruning on Fashion-MNIST: accuracy after pruning and after a short fine-tune, per method and sparsity.

A registry ResNet is trained to its plateau once (cached in ``--out/baseline``), then every method prunes a fresh copy
at each sparsity (``nm`` and ``intra-kernel`` have the sparsity their pattern fixes), BatchNorm statistics are
re-estimated, and the model is fine-tuned for ``--ft-epochs`` with the masks fixed. ``movement`` prunes during
training: its scores (-w * grad) accumulate over ``--movement-ramp`` epochs while the sparsity rises on the cubic
schedule, then it gets the same ``--ft-epochs`` with the masks fixed as the other methods (so it has no "after pruning"
figure, and one training epoch more per ramp epoch). One table, plus ``results.json``.

    python benchmarks/unstructured.py                                  # modest: 10k train images, 2k val
    python benchmarks/unstructured.py --train-subset 60000 --val-subset 10000 --epochs 10 --ft-epochs 2   # full

Everything runs on the CPU; one ResNet-20 epoch over 60k images takes about 145 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from prunekit import create_model, runs
from prunekit.data import dataset_info, get_dataset, make_loader
from prunekit.pruning.structured import recalibrate_bn
from prunekit.pruning.unstructured import GradualSchedule, Sparsifier, SparsifySettings
from prunekit.train import TrainSettings, evaluate, fit

FIXED = {"nm": {"nm": "2:4"}, "intra-kernel": {"pattern_keep": 4, "patterns": 8}}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--train-subset", type=int, default=10000, help="training images used (60000: all)")
    p.add_argument("--val-subset", type=int, default=2000, help="test images the figures are measured on (10000: all)")
    p.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    p.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs after pruning")
    p.add_argument("--movement-ramp", type=int, default=1, help="movement: epochs of gradual pruning before the "
                   "--ft-epochs with fixed masks")
    p.add_argument("--lr", type=float, default=0.1, help="baseline peak learning rate (fine-tune: lr / 10)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", default="l1,global,taylor,random,kernel,movement,nm,intra-kernel")
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--bn-batches", type=int, default=20, help="BatchNorm recalibration (and taylor) batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-unstructured")
    return p.parse_args()


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = dataset_info("fashion-mnist")
    ds = {s: get_dataset("fashion-mnist", s, data_dir=a.data_dir,
                         limit=a.val_subset if s == "test" else a.train_subset, seed=0)
          for s in ("train", "calib", "val", "test")}
    train = make_loader(ds["train"], a.batch_size, shuffle=True, seed=0)
    calib = make_loader(ds["calib"], a.batch_size, shuffle=True, seed=1)
    val = make_loader(ds["val"], 256)  # picks fit's best epoch; every figure printed is on the test split
    test = make_loader(ds["test"], 256)
    base_dir = out / "baseline"
    if (base_dir / runs.WEIGHTS).is_file():
        base = runs.read_metrics(base_dir)
        print(f"baseline: cached {base_dir}: top1 {base['top1']:.2f}%")
    else:
        torch.manual_seed(0)
        model = create_model(a.model, in_channels=info.in_channels, num_classes=info.num_classes)
        model.prunekit_spec.input = {"kind": "image", "shape": [1, info.in_channels, 28, 28]}
        t0 = time.perf_counter()
        fit(model, train, val, TrainSettings(epochs=a.epochs, lr=a.lr, weight_decay=5e-4, nesterov=True))
        base = {**evaluate(model, test), "train_seconds": round(time.perf_counter() - t0, 1), "stage": "train"}
        runs.save_model(base_dir, model)
        runs.write_metrics(base_dir, base)
        print(f"baseline: {a.model} {a.epochs} epochs on {a.train_subset} images: top1 {base['top1']:.2f}% "
              f"({base['train_seconds']:.0f} s)")
    ft = TrainSettings(epochs=a.ft_epochs, lr=a.lr / 10, weight_decay=5e-4, nesterov=True)
    x = torch.randn(1, info.in_channels, 28, 28)
    rows = []
    for method in a.methods.split(","):
        for s in ([None] if method in FIXED else [float(v) for v in a.sparsities.split(",")]):
            torch.manual_seed(0)
            model = runs.load_model(base_dir)
            settings = SparsifySettings.build({"method": method, "sparsity": s, "calib_batches": a.bn_batches,
                                               **FIXED.get(method, {})})
            sp = Sparsifier(model, settings, x, calib_data=calib)
            t0 = time.perf_counter()
            raw = pruned = None
            if method == "movement":
                total = a.movement_ramp + a.ft_epochs
                sched = GradualSchedule(sp, total * len(train), settings.target(), end=a.movement_ramp / total,
                                        recalibrate=lambda m: recalibrate_bn(m, calib, a.bn_batches))  # as the CLI
                fit(model, train, val, ft.model_copy(update={"epochs": total}), callbacks=[sp, sched])
                sched.finish()
            else:
                sp.step()
                raw = evaluate(model, test)["top1"]
                recalibrate_bn(model, calib, a.bn_batches)
                pruned = evaluate(model, test)["top1"]
                fit(model, train, val, ft, callbacks=[sp])
            final = evaluate(model, test)["top1"]
            rep = sp.report(x)
            row = {"method": method, "target": settings.target(), "sparsity": rep.sparsity,
                   "model_sparsity": rep.model_sparsity, "nonzero_params": rep.nonzero_params, "params": rep.params,
                   "top1_pruned_raw": raw, "top1_pruned": pruned, "top1_finetuned": final,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{method:>12} s={rep.sparsity:.3f}: raw {raw if raw is None else round(raw, 2)}  "
                  f"+BN {pruned if pruned is None else round(pruned, 2)}  fine-tuned {final:.2f}  "
                  f"({row['seconds']:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps({"args": vars(a), "baseline": base, "rows": rows},
                                                         indent=2))
    print(table(base, rows, a))


def table(base: dict, rows: list[dict], a: argparse.Namespace) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = [f"ResNet ({a.model}) on Fashion-MNIST ({a.train_subset} train / {a.val_subset} val images), baseline "
             f"top-1 {base['top1']:.2f}%; fine-tune {a.ft_epochs} epoch(s) at lr {a.lr / 10:g}; first conv and "
             "classifier dense.", "",
             "| method | sparsity (pruned layers) | whole model | top-1 pruned | + BN recal | + fine-tune |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {r['model_sparsity']:.3f} | {f(r['top1_pruned_raw'])} "
                     f"| {f(r['top1_pruned'])} | {f(r['top1_finetuned'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
