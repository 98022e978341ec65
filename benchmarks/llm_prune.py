"""Width pruning of the small stdlib-trained Llama: test perplexity of each method, without and with a short KD.

Rows (``benchmarks/llm_common.py``'s model: hidden 256, 4 layers, SwiGLU width 1024, GQA 8 query / 2 key-value
heads): dense; MLP width pruned 25% and 50% in every layer by magnitude, structured Wanda, VBP (variance) + mean and
VBP + lstsq (plus ablations: magnitude + lstsq, wanda + lstsq); one of the two GQA groups of every layer pruned
(variance + lstsq, magnitude). Calibration: ``--calib`` random windows of the train split (``--seeds`` samplings);
evaluation: ``--eval-windows`` windows of 256 bytes evenly spaced over the whole test split (files never looked at
when choosing defaults; the same windows for every model).
KD recovery (seed 0 only): ``--kd-steps`` AdamW steps of KL(dense || pruned) (T = 1, plus 0.5 CE on the bytes) on
train windows.

    OMP_NUM_THREADS=1 python benchmarks/llm_prune.py            # ~40 min on one shared core, model cached
    OMP_NUM_THREADS=1 python benchmarks/llm_prune.py --kd-steps 0 --seeds 0   # no KD, one seed: a few minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_common as lc  # noqa: E402

from prunekit.pruning.llm import prune_width  # noqa: E402
from prunekit.train.kd import kd_loss  # noqa: E402

log = logging.getLogger("llm_prune")

# name -> prune_width settings (None: dense); "kd": also run KD recovery
METHODS: dict[str, dict] = {
    "dense": {},
    **{f"mlp{p} magnitude": dict(mlp_ratio=p / 100, criterion="magnitude", compensate="none") for p in (25, 50)},
    **{f"mlp{p} wanda": dict(mlp_ratio=p / 100, criterion="wanda", compensate="none") for p in (25, 50)},
    **{f"mlp{p} vbp+mean": dict(mlp_ratio=p / 100, criterion="variance", compensate="mean") for p in (25, 50)},
    **{f"mlp{p} vbp+lstsq": dict(mlp_ratio=p / 100, criterion="variance", compensate="lstsq") for p in (25, 50)},
    "gqa50 vbp+lstsq": dict(head_ratio=0.5, criterion="variance", compensate="lstsq"),
    "gqa50 magnitude": dict(head_ratio=0.5, criterion="magnitude", compensate="none"),
}
ABLATIONS: dict[str, dict] = {  # no KD: do the criteria differ once lstsq compensation is on too?
    "mlp50 magnitude+lstsq": dict(mlp_ratio=0.5, criterion="magnitude", compensate="lstsq"),
    "mlp50 wanda+lstsq": dict(mlp_ratio=0.5, criterion="wanda", compensate="lstsq"),
    "mlp50 random+lstsq": dict(mlp_ratio=0.5, criterion="random", compensate="lstsq"),
    # hidden size (residual stream, across every RMSNorm and the tied embedding), 256 -> 192
    "hidden25 activation": dict(hidden_ratio=0.25, criterion="variance", compensate="none"),
    "hidden25 magnitude": dict(hidden_ratio=0.25, criterion="magnitude", compensate="none"),
    "hidden25 random": dict(hidden_ratio=0.25, criterion="random", compensate="none"),
}


def kd_recover(student: torch.nn.Module, teacher: torch.nn.Module, train: torch.Tensor, steps: int, batch: int,
               seq_len: int, lr: float, seed: int) -> float:
    """A plain KD loop; returns the mean loss of the last 20 steps."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:  # linear warmup over 10 steps, then cosine to 0
            g["lr"] = lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = lc.random_windows(train, batch, seq_len + 1, gen)
        with torch.no_grad():
            t = teacher(input_ids=x[:, :-1]).logits.flatten(0, 1)
        s = student(input_ids=x[:, :-1]).logits.flatten(0, 1)
        loss = kd_loss(s, t, x[:, 1:].flatten(), alpha=0.5, temperature=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            log.info("  kd step %d/%d loss %.3f", step, steps, loss.item())
    student.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 256 bytes from the train split")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration samplings")
    ap.add_argument("--eval-windows", type=int, default=512, help="test windows of 256 bytes scored")
    ap.add_argument("--kd-steps", type=int, default=100)
    ap.add_argument("--kd-batch", type=int, default=8)
    ap.add_argument("--kd-lr", type=float, default=5e-4)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--only", nargs="*", help="method names to run (default: all)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    dense, data = lc.get_small_llama()
    seq = lc.DEFAULT.seq_len
    test = lc.spaced_windows(data["test"], args.eval_windows, seq)

    def ppl(m: torch.nn.Module) -> float:
        return lc.perplexity(m, test, seq_len=seq, batch_size=16)

    methods = {**METHODS, **({} if args.no_ablations else ABLATIONS)}
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only or k == "dense"}
    rows: dict[str, dict] = {}
    unigram = lc.unigram_perplexity(data["train"], test)
    n_params = sum(p.numel() for p in dense.parameters())
    for name, settings in methods.items():
        t0 = time.time()
        if not settings:
            rows[name] = {"ppl": [ppl(dense)], "params": n_params}
            log.info("%s: %.3f", name, rows[name]["ppl"][0])
            continue
        r: dict = {"ppl": []}
        for seed in args.seeds:
            calib = lc.random_windows(data["train"], args.calib, seq, torch.Generator().manual_seed(seed))
            m = copy.deepcopy(dense)
            rep = prune_width(m, calib, seed=seed, **settings)
            r["ppl"].append(ppl(m))
            r["params"] = rep["params_after"]
            if seed == args.seeds[0] and args.kd_steps > 0 and name in METHODS:
                kd_recover(m, dense, data["train"], args.kd_steps, args.kd_batch, seq, args.kd_lr, seed)
                r["kd_ppl"] = ppl(m)
        rows[name] = r
        log.info("%s: %s%s  (%.0f s)", name, " / ".join(f"{p:.3f}" for p in r["ppl"]),
                 f"  kd {r['kd_ppl']:.3f}" if "kd_ppl" in r else "", time.time() - t0)
        if args.json:  # after every row: a partial run still leaves its figures
            args.json.write_text(json.dumps({"rows": rows, "unigram": unigram}, indent=1))

    d = rows["dense"]["ppl"][0]
    print(f"\nsmall Llama {n_params / 1e6:.2f} M params, test {args.eval_windows} windows x {seq} bytes, "
          f"calibration {args.calib} x {seq} train bytes, seeds {args.seeds}; unigram ppl {unigram:.2f}\n")
    print("| method | params | ppl (mean ± sd over seeds) | vs dense | after KD "
          f"({args.kd_steps} steps) |\n|---|---|---|---|---|")
    for name, r in rows.items():
        p = r["ppl"]
        sd = f" ± {statistics.stdev(p):.3f}" if len(p) > 1 else ""
        mean = statistics.mean(p)
        kd = f"{r['kd_ppl']:.3f}" if "kd_ppl" in r else "-"
        print(f"| {name} | {r['params'] / 1e6:.2f} M | {mean:.3f}{sd} | {100 * (mean / d - 1):+.1f}% | {kd} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                         "unigram": unigram}, indent=1))


if __name__ == "__main__":
    main()
