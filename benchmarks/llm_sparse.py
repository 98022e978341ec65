"""Unstructured and 2:4 sparsity of a small Llama: test perplexity for magnitude, Wanda and SparseGPT.

The model and text come from ``benchmarks/llm_common.py`` (a small Llama trained once on Python's standard-library
sources, byte tokens, cached). Every method prunes the linear layers inside the decoder blocks of a fresh copy
(embeddings / tied LM head dense) with ``prunekit.pruning.llm.prune_decoder``, block by block; calibration is
``--calib`` random windows of ``--seq-len`` bytes from the train split, drawn with each of ``--seeds`` (magnitude uses
no data, so it has one figure). Perplexity: ``--eval-windows`` windows of ``--seq-len`` bytes at evenly spaced offsets
over the whole test split (files never trained on), the same windows for every model. No fine-tuning anywhere.

    python benchmarks/llm_sparse.py                                   # 50%, 70%, 2:4, 4:8; seeds 0 and 1
    python benchmarks/llm_sparse.py --sparsities 0.5 --nm 2:4 --seeds 0
    python benchmarks/llm_sparse.py --methods wanda+seq,sparsegpt+seq           # sequential within each block

Prints one table (mean and min-max over the calibration seeds) and writes ``--json`` when given.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_common import get_small_llama, perplexity, random_windows, spaced_windows  # noqa: E402

from prunekit.pruning.llm.sparse import prune_decoder  # noqa: E402

log = logging.getLogger("llm_sparse")
METHODS = ("magnitude", "wanda", "sparsegpt")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparsities", default="0.5,0.7", help="unstructured sparsities, comma-separated")
    p.add_argument("--nm", default="2:4,4:8", help="N:M patterns, comma-separated ('' for none)")
    p.add_argument("--methods", default=",".join(METHODS), help="also NAME+seq: within each block, groups of "
                   "shared input pruned in order, each calibrated on the pruned ones before it (sequential=True)")
    p.add_argument("--seeds", default="0,1", help="calibration seeds (which train windows are drawn)")
    p.add_argument("--calib", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=256, help="test windows scored (evenly spaced)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def patterns(args: argparse.Namespace) -> list[tuple[str, float | None, tuple[int, int] | None]]:
    out: list[tuple[str, float | None, tuple[int, int] | None]] = []
    for s in filter(None, args.sparsities.split(",")):
        out.append((f"{float(s):.0%}", float(s), None))
    for nm in filter(None, args.nm.split(",")):
        n, m = map(int, nm.split(":"))
        out.append((nm, None, (n, m)))
    return out


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dense, data = get_small_llama()
    test = spaced_windows(data["test"], args.eval_windows, args.seq_len)
    ppl = lambda m: perplexity(m, test, seq_len=args.seq_len)  # noqa: E731
    t0 = time.time()
    base = ppl(dense)
    log.info("dense: ppl %.4f (%.0f s)", base, time.time() - t0)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = [{"method": "dense", "pattern": "-", "ppl": [base], "seconds": [0.0]}]
    for label, sparsity, nm in patterns(args):
        for method in args.methods.split(","):
            row = {"method": method, "pattern": label, "ppl": [], "seconds": [], "sparsity": []}
            for seed in seeds if method != "magnitude" else seeds[:1]:
                gen = torch.Generator().manual_seed(seed)
                calib = random_windows(data["train"], args.calib, args.seq_len, gen)
                batches = list(calib.split(16))
                model = copy.deepcopy(dense)
                t1 = time.time()
                r = prune_decoder(model, method.removesuffix("+seq"), sparsity=sparsity, nm=nm, calib_data=batches,
                                  sequential=method.endswith("+seq"))
                row["seconds"].append(time.time() - t1)
                row["sparsity"].append(r.sparsity)
                row["ppl"].append(ppl(model))
                log.info("%s %s seed %d: sparsity %.4f, ppl %.4f (prune %.1f s)", method, label, seed, r.sparsity,
                         row["ppl"][-1], row["seconds"][-1])
            rows.append(row)
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"\nsmall Llama ({n_params / 1e6:.2f} M params), test ppl over {args.eval_windows} windows of "
          f"{args.seq_len} bytes; calibration {args.calib} x {args.seq_len} train bytes, seeds {args.seeds}")
    print(f"{'method':<14} {'pattern':>7} {'sparsity':>9} {'ppl mean':>9} {'min':>8} {'max':>8} {'x dense':>8} "
          f"{'prune s':>8}")
    for r in rows:
        p = r["ppl"]
        mean = sum(p) / len(p)
        sp = f"{sum(r['sparsity']) / len(r['sparsity']):.4f}" if r.get("sparsity") else "0"
        print(f"{r['method']:<14} {r['pattern']:>7} {sp:>9} {mean:>9.3f} {min(p):>8.3f} {max(p):>8.3f} "
              f"{mean / base:>8.3f} {sum(r['seconds']) / len(r['seconds']):>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
