"""One size target for decoder LMs (issue 29, item 3): the shape the search keeps vs MLP-only, before and after KD.

Cells: the three small decoders of ``llm_corpora.MODELS`` x the three text domains. In each cell, the calibration
data is ``--calib`` random windows of the domain's train split (a quarter of them held out to score the candidate
shapes), the KD windows come from the same train split, and the test perplexity is measured on ``--eval-windows``
windows spread over the domain's test split (sources never used for training, calibration, the search or KD).

Rows per cell, both at ``--target`` of the parameters (``prune_to_params``, width settings at their defaults):
the shape the search chose among its default candidates, and MLP-only (``shapes=["mlp"]``; another shape with
``--compare``); each before and after
``--kd-steps`` of logit distillation from the dense model (``lm_distill``). Figures: test perplexity over the dense
model's, minus one (+10% = 1.10x the dense perplexity).

    OMP_NUM_THREADS=1 python benchmarks/llm_target.py                       # 3 models x 3 domains, 100 KD steps
    OMP_NUM_THREADS=1 python benchmarks/llm_target.py --models llama-byte --domains code --kd-steps 50
    OMP_NUM_THREADS=1 python benchmarks/llm_target.py --merge a.json b.json                # one table of saved runs
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_common as lc  # noqa: E402
import llm_corpora as corp  # noqa: E402

from prunekit.pruning.llm import prune_to_params  # noqa: E402
from prunekit.train.lm_kd import LMKDConfig, lm_distill  # noqa: E402

log = logging.getLogger("llm_target")


def run(dense: torch.nn.Module, calib: torch.Tensor, train: torch.Tensor, test: torch.Tensor, seq_len: int,
        args: argparse.Namespace, shapes: list[str] | None) -> dict:
    """Prune a copy of ``dense`` to the target (``shapes``: None = the default candidates), KD it; the figures."""
    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    kw = {"shapes": shapes} if shapes else {}
    rep = prune_to_params(m, calib, args.target, **kw)
    dense_ppl = lc.perplexity(dense, test, seq_len=seq_len)
    before = lc.perplexity(m, test, seq_len=seq_len) / dense_ppl - 1
    kd = LMKDConfig(kd_steps=args.kd_steps, kd_lr=args.kd_lr, kd_batch=args.kd_batch, kd_log_every=25)
    lm_distill(m, dense, train, kd, seq_len=seq_len, seed=args.seed)
    after = lc.perplexity(m, test, seq_len=seq_len) / dense_ppl - 1
    chosen = next(c for c in rep["candidates"] if c.get("chosen"))
    return {"shape": rep["chosen"], "widths": chosen["widths"], "params": rep["params_after"],
            "params_before": rep["params_before"], "before_kd": before, "after_kd": after,
            "candidates": rep["candidates"], "seconds": round(time.perf_counter() - t0, 1)}


def cell(name: str, domain: str, args: argparse.Namespace) -> dict:
    spec = corp.MODELS[name]
    dense = corp.get_model(name)
    toks = corp.domain_tokens(domain, spec.tokenizer)
    calib = lc.random_windows(toks["train"], args.calib, spec.seq_len, torch.Generator().manual_seed(args.seed))
    test = lc.spaced_windows(toks["test"], args.eval_windows, spec.seq_len)
    best = run(dense, calib, toks["train"], test, spec.seq_len, args, None)
    other = args.compare
    mlp = best if best["shape"] == other else run(dense, calib, toks["train"], test, spec.seq_len, args, [other])
    for what, r in (("chosen", best), (other, mlp)):
        log.info("%s / %s: %s %s params %d: %+.1f%% -> %+.1f%% after KD (%.0f s)", name, domain, what, r["shape"],
                 r["params"], 100 * r["before_kd"], 100 * r["after_kd"], r["seconds"])
    return {"model": name, "domain": domain, "chosen": best, "mlp": mlp, "compare": other}


def _pct(v: float) -> str:
    return f"{100 * v:+.1f}%"


def table(results: list[dict], args: argparse.Namespace) -> str:
    o = results[0].get("compare", "mlp") if len({r.get("compare", "mlp") for r in results}) == 1 else "other"
    head = (f"| model | domain | chosen shape (widths) | params kept | chosen | chosen + KD {args.kd_steps} | "
            f"{o} params | {o} | {o} + KD {args.kd_steps} |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        b, m = r["chosen"], r["mlp"]
        widths = ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in b["widths"].items())
        lines.append(f"| {r['model']} | {r['domain']} | {b['shape']} ({widths}) | "
                     f"{b['params'] / b['params_before']:.3f} | {_pct(b['before_kd'])} | {_pct(b['after_kd'])} | "
                     f"{m['params'] / m['params_before']:.3f} | {_pct(m['before_kd'])} | {_pct(m['after_kd'])} |")
    cols = [("chosen", "before_kd"), ("chosen", "after_kd"), ("mlp", "before_kd"), ("mlp", "after_kd")]
    means = [statistics.mean(r[a][k] for r in results) for a, k in cols]
    lines.append(f"| mean | | | | {_pct(means[0])} | {_pct(means[1])} | | {_pct(means[2])} | {_pct(means[3])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(corp.MODELS))
    ap.add_argument("--domains", nargs="+", default=list(corp.DOMAINS))
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--kd-steps", type=int, default=100)
    ap.add_argument("--kd-lr", type=float, default=3e-4)
    ap.add_argument("--kd-batch", type=int, default=8)
    ap.add_argument("--calib", type=int, default=64, help="calibration windows per cell")
    ap.add_argument("--eval-windows", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", default="mlp", help="the shape shown beside the chosen one (default: MLP-only)")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="+", default=[], help="print one table of these --out files and stop")
    args = ap.parse_args()
    if args.merge:
        print(table([r for f in args.merge for r in json.loads(Path(f).read_text())], args))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = [cell(n, d, args) for n in args.models for d in args.domains]
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
