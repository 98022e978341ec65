"""Decoder width pruning across models and text domains: which criterion and compensation hold everywhere.

Cells: the three small decoders of ``llm_corpora.MODELS`` (Llama MHA + bytes, Qwen2 GQA + BPE, Mistral GQA +
bytes, each trained once on a mixture of the three domains) x the three domains (``code``, ``man``,
``reference``). In each cell the calibration text is ``--calib`` random windows of the domain's train split and the
test perplexity is measured on ``--eval-windows`` windows spread over the domain's test split (sources never used
for training, calibration or any choice). No fine-tuning. Every figure is the pruned model's test perplexity over
the dense model's, minus one (+10% = 1.10x the dense perplexity).

Rows: MLP width 50% in every layer by magnitude (no compensation), torch-pruning's procedure (its LLM example:
``GroupMagnitudeImportance(p=2)``, torch-pruning 1.6's ``GroupNormImportance``; ``MetaPruner``, local,
``round_to=4``, restricted to the MLP), structured Wanda,
each criterion with least-squares compensation (``lstsq``); half the key-value groups of every layer likewise.

    OMP_NUM_THREADS=2 python benchmarks/llm_grid.py                 # all rows, seeds 0 1 (models cached)
    OMP_NUM_THREADS=2 python benchmarks/llm_grid.py --rows mlp50 --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/llm_grid.py --split val --skip "mlp50 obs+lstsq+rec" "kv50 magnitude+rec"
        # the val split, where the defaults (criterion auto, reconstruction) were chosen
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

from prunekit.pruning.llm import prune_width  # noqa: E402

log = logging.getLogger("llm_grid")

ROWS: dict[str, dict] = {
    "mlp50 magnitude": dict(mlp_ratio=0.5, criterion="magnitude", compensate="none"),
    "mlp50 torch-pruning": {"tp": True},
    "mlp50 wanda": dict(mlp_ratio=0.5, criterion="wanda", compensate="none"),
    "mlp50 wanda+lstsq": dict(mlp_ratio=0.5, criterion="wanda", compensate="lstsq"),
    "mlp50 variance+lstsq": dict(mlp_ratio=0.5, criterion="variance", compensate="lstsq"),
    "mlp50 fluctuation+lstsq": dict(mlp_ratio=0.5, criterion="fluctuation", compensate="lstsq"),
    "mlp50 obs+lstsq": dict(mlp_ratio=0.5, criterion="obs", compensate="lstsq"),
    # reconstruct_steps=0: without block reconstruction (prune_width's auto turns it on when heads are pruned)
    "kv50 magnitude": dict(head_ratio=0.5, criterion="magnitude", compensate="none", reconstruct_steps=0),
    "kv50 wanda+lstsq": dict(head_ratio=0.5, criterion="wanda", compensate="lstsq", reconstruct_steps=0),
    "kv50 variance+lstsq": dict(head_ratio=0.5, criterion="variance", compensate="lstsq", reconstruct_steps=0),
    "kv50 fluctuation+lstsq": dict(head_ratio=0.5, criterion="fluctuation", compensate="lstsq", reconstruct_steps=0),
    "kv50 obs+lstsq": dict(head_ratio=0.5, criterion="obs", compensate="lstsq", reconstruct_steps=0),
    "kv50 merge": dict(kv_ratio=0.5, reconstruct_steps=0),
    # block reconstruction (200 relative-Adam steps per layer on the calibration windows, no labels)
    "mlp50 obs+lstsq+rec": dict(mlp_ratio=0.5, criterion="obs", compensate="lstsq", reconstruct_steps=200),
    "kv50 variance+lstsq+rec": dict(head_ratio=0.5, criterion="variance", compensate="lstsq", reconstruct_steps=200),
    "kv50 magnitude+rec": dict(head_ratio=0.5, criterion="magnitude", compensate="none", reconstruct_steps=200),
    "kv50 merge+rec": dict(kv_ratio=0.5, reconstruct_steps=200),
}


def tp_mlp(model: torch.nn.Module, ratio: float, example: torch.Tensor) -> None:
    """torch-pruning's LLM example procedure on the MLP only (attention, embeddings and the residual stream ignored)."""
    import torch_pruning as tp

    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        ignored += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.down_proj]
    pruner = tp.pruner.MetaPruner(model, example_inputs=example,
                                  importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                  global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, round_to=4,
                                  output_transform=lambda out: out.logits)
    for g in pruner.step(interactive=True):
        g.prune()
    width = model.model.layers[0].mlp.gate_proj.out_features
    model.config.intermediate_size = width
    for layer in model.model.layers:
        layer.mlp.intermediate_size = width


def run_row(model: torch.nn.Module, row: dict, calib: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    m = copy.deepcopy(model)
    if row.get("tp"):
        tp_mlp(m, 0.5, calib[:1])
        return m, {}
    rep = prune_width(m, calib, **row)
    return m, {"params_after": rep["params_after"]}


def cell(name: str, domain: str, rows: list[str], seed: int, n_calib: int, n_eval: int,
         split: str = "test") -> dict[str, float]:
    spec = corp.MODELS[name]
    model = corp.get_model(name)
    toks = corp.domain_tokens(domain, spec.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    calib = lc.random_windows(toks["train"], n_calib, spec.seq_len, gen)
    test = lc.spaced_windows(toks[split], n_eval, spec.seq_len)
    dense = lc.perplexity(model, test, seq_len=spec.seq_len)
    out = {"dense": dense}
    for r in rows:
        if r.startswith("kv50") and spec.kv_heads < 2:
            continue
        t0 = time.perf_counter()
        m, _ = run_row(model, ROWS[r], calib)
        out[r] = lc.perplexity(m, test, seq_len=spec.seq_len) / dense - 1
        log.info("%s / %s / seed %d: %s %+.1f%% (%.1f s)", name, domain, seed, r, 100 * out[r],
                 time.perf_counter() - t0)
    return out


def table(results: list[dict], rows: list[str]) -> str:
    cells = sorted({(r["model"], r["domain"]) for r in results})
    head = "| row | " + " | ".join(f"{m} {d}" for m, d in cells) + " | mean | worst |"
    lines = [head, "|" + "---|" * (len(cells) + 3)]
    for row in rows:
        vals = []
        for c in cells:
            xs = [r[row] for r in results if (r["model"], r["domain"]) == c and row in r]
            vals.append(statistics.mean(xs) if xs else None)
        got = [v for v in vals if v is not None]
        if not got:
            continue
        fmt = [f"{100 * v:+.1f}%" if v is not None else "-" for v in vals]
        lines.append(f"| {row} | " + " | ".join(fmt) + f" | {100 * statistics.mean(got):+.1f}% | "
                     f"{100 * max(got):+.1f}% |")
    dense = [statistics.mean(r["dense"] for r in results if (r["model"], r["domain"]) == c) for c in cells]
    lines.append("| dense perplexity | " + " | ".join(f"{d:.2f}" for d in dense) + " | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(corp.MODELS))
    ap.add_argument("--domains", nargs="+", default=list(corp.DOMAINS))
    ap.add_argument("--rows", nargs="+", default=["mlp50", "kv50"], help="row names or prefixes")
    ap.add_argument("--skip", nargs="*", default=[], help="row names or prefixes left out")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--calib", type=int, default=64, help="calibration windows per cell")
    ap.add_argument("--eval-windows", type=int, default=160)
    ap.add_argument("--split", default="test", choices=["val", "test"],
                    help="the text scored: val (where defaults are chosen) or test (what is reported)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [r for r in ROWS if any(r == p or r.startswith(p) for p in args.rows)
            and not any(r == p or r.startswith(p) for p in args.skip)]
    results = []
    for name in args.models:
        for domain in args.domains:
            for seed in args.seeds:
                results.append({"model": name, "domain": domain, "seed": seed,
                                **cell(name, domain, rows, seed, args.calib, args.eval_windows, args.split)})
    print(table(results, rows))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
