"""Speed of VBP's machinery: statistics throughput vs a plain forward, and graph + prune seconds.

For torchvision ResNet-50 and timm ViT-B/16 (random weights):
  * statistics throughput: ``collect_stats`` over the same batches as a plain ``torch.no_grad`` forward, the two
    timed alternately (medians over rounds; this machine is noisy). Reported as forward time / statistics time
    (1.0 = free), and again without the one-off set-up of each call (finding the points and consumers, timed
    alone), which a real calibration run of tens of batches amortises. Two target sets: the VBP layers
    (``interior`` / ``mlp-only``) and every prunable layer. The graph is traced once beforehand and passed in
    (its cost is the "trace" column).
  * graph + prune seconds: tracing the dependency graph, and a whole ``prune()`` call (l1 at ratio 0.5; variance
    + mean compensation on the calibration batches).

    python benchmarks/prune_speed.py                            # about 10 minutes on 2 cores
    python benchmarks/prune_speed.py --models resnet50 --batch-size 8 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from prunekit.pruning import prune
from prunekit.pruning.structured.graph import PruningGraph
from prunekit.pruning.structured.plan import plan_units
from prunekit.pruning.structured.settings import PruneSettings
from prunekit.pruning.structured.stats import _Finder, collect_stats


def build(name: str) -> tuple[nn.Module, str]:
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(), "interior"
    if name == "vit_b16":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False), "mlp-only"
    raise SystemExit(f"unknown model {name!r}: choose resnet50 or vit_b16")


def targets(graph: PruningGraph, preset: str | None) -> list[str]:
    units = plan_units(graph, PruneSettings.build({"preset": preset}))
    return sorted({n for u in units for n in u.layers})


def find_points(model: nn.Module, graph: PruningGraph, names: list[str]) -> None:
    """What ``collect_stats`` does once per call before its first batch: find every layer's measuring point and
    the layers consuming its channels (one torch-pruning group per layer)."""
    finder = _Finder(model, graph.DG)
    for n in names:
        finder.point(n)
        finder.consumers(n)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, data: list[torch.Tensor], rounds: int) -> list[tuple]:
    model, preset = build(name)
    model.eval()
    example = data[0][:1]
    t_trace = timed(lambda: PruningGraph(model, example))
    graph = PruningGraph(model, example)
    rows = []

    def forward() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    for label, names in {preset: targets(graph, preset), "all": targets(graph, None)}.items():
        fwd, st, su = [], [], []
        stats = partial(collect_stats, model, data, names, graph=graph)
        setup = partial(find_points, model, graph, names)
        for r in range(rounds):  # alternate which goes first
            order = [(fwd, forward), (st, stats), (su, setup)]
            for out, fn in order if r % 2 == 0 else order[::-1]:
                out.append(timed(fn))
        f, s, u = statistics.median(fwd), statistics.median(st), statistics.median(su)
        rows.append((name, f"{label} ({len(names)} layers)", f, s, u, f / s, f / (s - u)))
        print(f"{name:<9} stats {label:<9} forward {f:6.2f}s  stats {s:6.2f}s (set-up {u:.2f}s)  throughput "
              f"{f / s:.2f}x, {f / (s - u):.2f}x without the set-up", flush=True)
    t_l1 = timed(lambda: prune(copy.deepcopy(model), example, "l1", ratio=0.5))
    t_var = timed(lambda: prune(copy.deepcopy(model), example, "variance", ratio=0.5, preset=preset,
                                calib_data=data, compensate="mean"))
    rows.append((name, "trace / prune", t_trace, t_l1, t_var))
    print(f"{name:<9} trace {t_trace:.2f}s  prune l1 {t_l1:.2f}s  prune variance+mean ({preset}) {t_var:.2f}s",
          flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit_b16")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="batches per timed pass")
    ap.add_argument("--rounds", type=int, default=3, help="alternating forward/statistics rounds (medians)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    data = [torch.randn(a.batch_size, 3, a.image_size, a.image_size) for _ in range(a.batches)]
    rows = []
    for name in a.models.split(","):
        rows += bench(name, data, a.rounds)

    print(f"\nbatches: {a.batches} x {a.batch_size} images of {a.image_size}px, {torch.get_num_threads()} threads, "
          f"medians of {a.rounds} alternating rounds")
    print(f"{'model':<10}{'statistics targets':<26}{'forward s':>10}{'stats s':>10}{'set-up s':>10}"
          f"{'throughput':>11}{'w/o set-up':>11}")
    for name, label, f, s, u, ratio, per_batch in (r for r in rows if r[1] != "trace / prune"):
        print(f"{name:<10}{label:<26}{f:>10.2f}{s:>10.2f}{u:>10.2f}{ratio:>10.2f}x{per_batch:>10.2f}x")
    print(f"\n{'model':<10}{'trace s':>9}{'prune l1 s':>12}{'prune variance+mean s':>23}")
    for name, _, t, l1, var in (r for r in rows if r[1] == "trace / prune"):
        print(f"{name:<10}{t:>9.2f}{l1:>12.2f}{var:>23.2f}")


if __name__ == "__main__":
    main()
