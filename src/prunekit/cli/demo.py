"""``prunekit demo``."""

from __future__ import annotations

from typing import Any

from prunekit.cli.args import command
from prunekit.pipeline.demo import DemoConfig, run_demo


@command("demo", DemoConfig, help="Train, prune, fine-tune and compare on the embedded default (digits), offline")
def demo_cmd(cfg: DemoConfig) -> None:
    import time

    from rich.console import Console
    from rich.table import Table

    t0 = time.perf_counter()
    r = run_demo(cfg)
    b, p = r["baseline"], r["pruned"]
    t = Table(title=f"prunekit demo: {b.get('dataset', 'digits')}, baseline vs pruned + fine-tuned")
    for col in ("", "baseline", "pruned", "change"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("top-1 (%)", f"{b['top1']:.2f}", f"{p['top1']:.2f}", f"{-r['top1_drop']:+.2f} pts")
    t.add_row("MACs (M)", f"{b['macs'] / 1e6:.2f}", f"{p['macs'] / 1e6:.2f}", f"{-r['macs_reduction']:+.1%}")
    t.add_row("params (K)", f"{b['params'] / 1e3:.1f}", f"{p['params'] / 1e3:.1f}", f"{-r['params_reduction']:+.1%}")
    t.add_row("latency (ms, batch 1, eager PyTorch)", f"{b['latency_ms']:.3f}", f"{p['latency_ms']:.3f}",
              f"{-r['latency_reduction']:+.1%}")
    Console().print(t)
    if r.get("deployment"):
        Console().print(_deployment_table(r["deployment"]))
    print(f"wrote {cfg.out}/comparison.json ({time.perf_counter() - t0:.0f} s)")
    if r.get("report"):
        print(f"report: {r['report']}")


def _deployment_table(d: dict[str, Any]) -> Any:
    """Baseline vs pruned on each runtime (eager PyTorch, ONNX Runtime float32 and int8), timed side by side."""
    from rich.table import Table

    ms = {(x["model"], x["runtime"], x["precision"]): x for x in d["rows"]}
    names = {"eager": "eager PyTorch", "onnxruntime": "ONNX Runtime"}
    t = Table(title=f"the same two models per runtime: ms at batch {d['batch']}, {d['threads']} threads, timed "
              "alternately (rounds' lowest-highest median)")
    for col in ("runtime", "precision", "baseline", "pruned", "change"):
        t.add_column(col, justify="left" if col in ("runtime", "precision") else "right")
    for _, rt, prec in [k for k in ms if k[0] == "dense"]:
        a, b = ms[("dense", rt, prec)], ms[("pruned", rt, prec)]
        t.add_row(names.get(rt, rt), prec, *(f"{x['median_ms']:.2f} ({x['round_min_ms']:.2f}-{x['round_max_ms']:.2f})"
                                             for x in (a, b)), f"{-d['latency_reduction'][f'{rt} {prec}']:+.1%}")
    acc = d["accuracy"]
    t.caption = (f"test top-1 on ONNX Runtime (baseline / pruned): float32 {acc['dense']['top1_float']:.2f} / "
                 f"{acc['pruned']['top1_float']:.2f}, int8 {acc['dense']['top1_int8']:.2f} / "
                 f"{acc['pruned']['top1_int8']:.2f}\npruned int8 on ONNX Runtime: "
                 f"{d['pruned_int8_vs_dense_eager']:.2f}x faster than the baseline in eager PyTorch (float32)")
    return t
