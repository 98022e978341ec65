"""``prunekit demo``."""

from __future__ import annotations

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
    t.add_row("latency (ms, batch 1)", f"{b['latency_ms']:.3f}", f"{p['latency_ms']:.3f}",
              f"{-r['latency_reduction']:+.1%}")
    Console().print(t)
    print(f"wrote {cfg.out}/comparison.json ({time.perf_counter() - t0:.0f} s)")
    if r.get("report"):
        print(f"report: {r['report']}")
