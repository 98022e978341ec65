"""Recovery on real data: one-shot VBP / L1 / Taylor and pruning-aware training, each followed by KD fine-tuning.

Prints baseline, retention (top-1 right after pruning, BN recalibrated), top-1 after fine-tuning, MACs and params
side by side. Every figure comes from run directories this script writes under --out.

    python benchmarks/recovery.py --baseline runs/fmnist_base --target-macs 0.5 --ft-epochs 5 --ft-lr 0.05
    python benchmarks/recovery.py --train-epochs 10          # trains the baseline first (~25 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from prunekit import runs
from prunekit.cli.main import setup_logging
from prunekit.pipeline.recipe import STAGES


def stage(name: str, **values):
    st = STAGES.get(name)
    return st.run(st.config.build(values, source=f"benchmark {name}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="an existing baseline run directory (else one is trained)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--train-epochs", type=int, default=10)
    ap.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs kept")
    ap.add_argument("--ft-epochs", type=int, default=5)
    ap.add_argument("--ft-lr", type=float, default=0.05, help="peak lr of the cosine schedule (0.05 recovers more "
                    "than 0.01 in 5 epochs on Fashion-MNIST: docs/benchmarks/recovery.md)")
    ap.add_argument("--ft-warmup", type=float, default=0.2, help="linear warm-up epochs")
    ap.add_argument("--pat-steps", type=int, default=3)
    ap.add_argument("--criteria", default="l1,taylor,variance")
    ap.add_argument("--calib-batches", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_recovery"))
    a = ap.parse_args()
    setup_logging(verbose=False)
    logging.getLogger("prunekit.pipeline").setLevel(logging.INFO)
    a.out.mkdir(parents=True, exist_ok=True)

    base = a.baseline
    if base is None:
        base = a.out / "baseline"
        if not (base / runs.METRICS).is_file():
            stage("baseline", model=a.model, dataset=a.dataset, epochs=a.train_epochs, lr=0.1, warmup_epochs=0.5,
                  batch_size=a.batch_size, out=str(base), overwrite=True)
    b = runs.read_metrics(base)
    rows = []
    common = dict(target_macs=a.target_macs, calib_batches=a.calib_batches, batch_size=a.batch_size)
    ft = dict(epochs=a.ft_epochs, lr=a.ft_lr, warmup_epochs=a.ft_warmup, kd=True, teacher=str(base),
              batch_size=a.batch_size)
    for crit in a.criteria.split(","):
        t0 = time.perf_counter()
        comp = "mean" if crit.startswith("variance") else "none"
        p = a.out / f"{crit}-oneshot"
        pm = runs.read_metrics(p) if (p / runs.METRICS).is_file() else stage(
            "prune", **{"from": str(base)}, out=str(p), criterion=crit, compensate=comp, overwrite=True, **common)
        f = a.out / f"{crit}-oneshot-ft"
        fm = runs.read_metrics(f) if (f / runs.METRICS).is_file() else stage(
            "finetune", **{"from": str(p)}, out=str(f), overwrite=True, **ft)
        rows.append((f"{crit} one-shot", pm["top1"], fm["top1"], fm["macs"], fm["params"], time.perf_counter() - t0))
    if a.pat_steps:
        t0 = time.perf_counter()
        p = a.out / "variance-pat"
        pat_epochs = max(1, (a.ft_epochs - 1) // a.pat_steps)
        pm = runs.read_metrics(p) if (p / runs.METRICS).is_file() else stage(
            "pat", **{"from": str(base)}, out=str(p), criterion="variance", compensate="mean", steps=a.pat_steps,
            epochs=pat_epochs, lr=a.ft_lr, warmup_epochs=a.ft_warmup, kd=True, overwrite=True, **common)
        rest = max(0, a.ft_epochs - pat_epochs * a.pat_steps)
        f = a.out / "variance-pat-ft"
        fm = pm if rest == 0 else (runs.read_metrics(f) if (f / runs.METRICS).is_file() else stage(
            "finetune", **{"from": str(p)}, out=str(f), overwrite=True, **{**ft, "epochs": rest}))
        rows.append((f"variance PAT {a.pat_steps}x{pat_epochs}+{rest}", pm["retention"][0]["top1"], fm["top1"],
                     fm["macs"], fm["params"], time.perf_counter() - t0))

    print(f"\n{a.model} on {a.dataset}: baseline top-1 {b['top1']:.2f}%, {b['macs'] / 1e6:.2f} M MACs, "
          f"{b['params'] / 1e3:.1f} K params; target {a.target_macs:.0%} of MACs kept; KD fine-tuning "
          f"{a.ft_epochs} epochs in total")
    print("| method | retention top-1 | fine-tuned top-1 | drop (pts) | MACs (M) | MACs cut | params (K) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ret, top1, macs, params, secs in rows:
        print(f"| {name} | {ret:.2f} | {top1:.2f} | {b['top1'] - top1:+.2f} | {macs / 1e6:.2f} | "
              f"{1 - macs / b['macs']:.1%} | {params / 1e3:.1f} | {secs:.0f} |")
    (a.out / "results.json").write_text(json.dumps({"baseline": b, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
