"""torchvision detectors pruned whole: MACs and params kept, convolutions left whole, forward after pruning.

Each model is built by name (``tv:...``, random weights: no download), pruned with ``prunekit.prune(model, x,
criterion=..., target_macs=T)``: ``l2`` without data, ``variance`` with ``--calib`` random calibration images (batches
of 2). Printed per run:

- MACs kept: of the full eval forward (transform, backbone, RPN/RoI heads or dense heads, postprocessing; for the
  R-CNN models this counts the RoI box head once per proposal, so it moves with the proposals' number) and of the
  raw forward (what torch-pruning traces: backbone, FPN and heads up to their raw outputs, no proposals);
- params kept; conv and linear layers outside the heads' output layers that kept all their output channels (the
  goal: none; a layer the selection chose to keep whole counts too);
- whether the pruned model still runs its eval forward (boxes/labels/scores) and its train forward (finite losses).

    OMP_NUM_THREADS=1 python benchmarks/tv_detect.py
    OMP_NUM_THREADS=1 python benchmarks/tv_detect.py --models ssdlite320_mobilenet_v3_large --criteria l2
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit.measure import count_macs, count_params
from prunekit.pruning.structured.tv_detect import head_output_layers, trace_form

MODELS = {  # name -> (image size, model kwargs); R-CNN/RetinaNet resize to min_size (800 by default: slow on a CPU)
    "fasterrcnn_mobilenet_v3_large_fpn": (128, {"min_size": 128, "max_size": 128}),
    "ssdlite320_mobilenet_v3_large": (320, {}),  # fixed 320 x 320
    "retinanet_resnet50_fpn": (128, {"min_size": 128, "max_size": 128}),
}


class RawForward(nn.Module):
    """A detector's raw forward (its trace form) as a module, for counting its MACs."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector, self.form = detector, trace_form(detector)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.form(self.detector, x)


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer."""
    return {n: m.weight.shape[1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0]
            * (m.groups if isinstance(m, nn.modules.conv._ConvTransposeNd) else 1)
            for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


def forward_ok(model: nn.Module, size: int, num_classes: int) -> str:
    """``"ok"`` when the eval forward gives boxes/labels/scores and the train forward finite losses, else why not."""
    x = [torch.rand(3, size, size) for _ in range(2)]  # 2 images: SSDlite's last level is 1 x 1 (BatchNorm in train)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, size / 2, size / 2]]), "labels": torch.tensor([1])}] * 2
    try:
        with torch.no_grad():
            out = model.eval()(x)
        if not all(o["boxes"].shape[-1] == 4 and o["scores"].dim() == 1 for o in out):
            return "eval output malformed"
        losses = model.train()(x, targets)
        model.eval()
        if not all(math.isfinite(float(v.detach())) for v in losses.values()):
            return f"non-finite losses {sorted(losses)}"
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"{type(e).__name__}: {str(e)[:80]}"


def run_one(name: str, criterion: str, target: float, calib: int) -> dict[str, Any]:
    size, kwargs = MODELS[name]
    torch.manual_seed(0)
    num_classes = 5
    model = prunekit.create_model(f"tv:{name}", num_classes=num_classes, **kwargs).eval()
    x = torch.rand(1, 3, size, size)
    outputs = set(head_output_layers(model, x))
    before, params0 = widths(model), count_params(model)
    macs0, raw0 = count_macs(model, x), count_macs(RawForward(model), x)
    # batches of 2 images: BatchNorm re-estimation runs SSDlite's 1 x 1 last level in train mode
    data = [torch.rand(2, 3, size, size) for _ in range(calib // 2)] if criterion != "l2" else None
    t0 = time.perf_counter()
    prunekit.prune(model, x, criterion=criterion, target_macs=target, calib_data=data)
    seconds = time.perf_counter() - t0
    after = widths(model)
    inner = [n for n in before if n not in outputs]
    whole = [n for n in inner if after[n] == before[n]]
    return {"model": name, "criterion": criterion, "macs": count_macs(model, x) / macs0,
            "raw_macs": count_macs(RawForward(model), x) / raw0, "params": count_params(model) / params0,
            "whole": whole, "inner": len(inner), "outputs_kept": all(after[n] == before[n] for n in outputs),
            "forward": forward_ok(model, size, num_classes), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--criteria", nargs="+", default=["l2", "variance"])
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--calib", type=int, default=4, help="random calibration images for data criteria")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    print(f"{'model':36} {'criterion':9} {'MACs kept':>9} {'raw MACs':>9} {'params':>7} {'whole':>7} "
          f"{'heads kept':>10} {'forward':>8} {'s':>6}")
    for name in args.models:
        for criterion in args.criteria:
            r = run_one(name, criterion, args.target_macs, args.calib)
            print(f"{r['model']:36} {r['criterion']:9} {r['macs']:9.3f} {r['raw_macs']:9.3f} {r['params']:7.3f} "
                  f"{len(r['whole']):>3}/{r['inner']:<3} {str(r['outputs_kept']):>10} {r['forward']:>8} "
                  f"{r['seconds']:6.1f}", flush=True)
            if r["whole"]:
                print(f"    left whole: {', '.join(r['whole'])}")


if __name__ == "__main__":
    main()
