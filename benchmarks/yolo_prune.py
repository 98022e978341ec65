"""YOLO pruned to half its MACs on the generated detection set: prunekit's criteria against torch-pruning's procedure.

A YOLOv8n (``--models yolov8n,yolo11n`` for both) is trained once with Ultralytics' trainer on ``fashion-detect`` (the
generated Fashion-MNIST detection set, ``--image-size`` px) and cached under ``~/.cache/prunekit/bench/yolo``. Each
method then prunes a copy to ``--target-macs`` of the MACs with calibration on the train images (BatchNorm
re-estimated on the same batches for every method), and every pruned model gets the same short fine-tune
(``--ft-epochs``, default 10% of the baseline's epochs, Ultralytics' trainer keeping the pruned widths, no KD):

- ``variance``: ``prunekit.prune(criterion="variance", compensate="lstsq")`` (the library's default with data);
- ``l1``: ``criterion="l1"``, no compensation;
- ``taylor``: ``criterion="taylor"`` with Ultralytics' detection loss (``prunekit.pipeline.detect.yolo_loss_fn``);
- ``anchor``: torch-pruning's own YOLOv8 procedure (its ``examples/yolov8``): C2f replaced by a split-free equal
  block (torch-pruning's ``C2f_v2``; here prunekit's identical rewrite, because torch-pruning 1.6 fails with an
  ``IndexError`` on Ultralytics 8.4's C2f as it is), the whole Detect head ignored, ``MetaPruner`` +
  ``GroupMagnitudeImportance(p=2)``, one shot, its ratio searched to the same MACs target.

Printed per method: MACs kept; convolutions outside the head's output layers (box / DFL / class convs) that kept all
their channels; test mAP50-95 (COCO AP, ``prunekit.pipeline.detect.test_detection``) right after pruning as a
fraction of the dense model's and after the fine-tune (points against dense); ONNX Runtime latency at batch 1 timed
alternately with the dense model (one thread) and the latency cut as a fraction of the MACs cut.

    OMP_NUM_THREADS=1 python benchmarks/yolo_prune.py
    OMP_NUM_THREADS=1 python benchmarks/yolo_prune.py --models yolov8n,yolo11n --epochs 30 --image-size 96
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")

import prunekit  # noqa: E402
from prunekit.measure import count_macs  # noqa: E402
from prunekit.pipeline.detect import data_yaml, export_form, loader, split_dataset, test_detection, yolo_loss_fn  # noqa: E402,E501
from prunekit.pruning.structured.bn import recalibrate_bn  # noqa: E402

CACHE = Path.home() / ".cache" / "prunekit" / "bench" / "yolo"
METHODS = ("variance", "l1", "taylor", "anchor")
PRUNEKIT = {"variance": {"criterion": "variance", "compensate": "lstsq"},
            "l1": {"criterion": "l1", "compensate": "none"}, "taylor": {"criterion": "taylor", "compensate": "none"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="yolov8n", help="comma-separated Ultralytics yaml stems")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs (cached)")
    p.add_argument("--lr", type=float, default=0.002, help="AdamW learning rate of the baseline's training")
    p.add_argument("--ft-lr", type=float, default=0.001, help="AdamW learning rate of the fine-tune")
    p.add_argument("--ft-epochs", type=int, default=None, help="fine-tune epochs (default: 10%% of --epochs, >= 1)")
    p.add_argument("--train-samples", type=int, default=1000, help="training images (of fashion-detect's 1000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--latency-runs", type=int, default=1000, help="timed runs per model (20 alternating rounds)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "fashion-detect", "data_dir": None, "image_size": args.image_size,
            "train_samples": args.train_samples}


def yolo_train(model: nn.Module, data: dict[str, Any], epochs: int, batch: int, lr: float) -> nn.Module:
    """Ultralytics' trainer (its loss, EMA, schedule; val picks the epoch), pruned widths kept: AdamW at ``lr`` (its
    ``auto`` choice, AdamW at 7e-4 for 10 classes, is made for fine-tuning pretrained weights), one warm-up epoch, no
    mosaic (four 64 px images in one shrink the objects to a few pixels)."""
    from prunekit.models.ultralytics_io import finetune_yolo

    with tempfile.TemporaryDirectory(prefix="yolo-bench-") as tmp:
        trained, _ = finetune_yolo(model, data_yaml(data, Path(tmp)), epochs=epochs, imgsz=data["image_size"],
                                   batch=batch, workers=0, plots=False, amp=False, seed=0, deterministic=True,
                                   verbose=False, optimizer="AdamW", lr0=lr, warmup_epochs=1, mosaic=0.0)
    return trained.float().eval()


def dense_model(name: str, data: dict[str, Any], args: argparse.Namespace) -> tuple[nn.Module, float]:
    """The trained dense model (cached: safetensors of the plain Ultralytics model) and its training seconds."""
    from safetensors.torch import load_model, save_model
    from ultralytics.nn.tasks import DetectionModel

    key = hashlib.sha1(json.dumps([name, data, args.epochs, args.batch_size, args.lr]).encode()).hexdigest()[:10]
    folder = CACHE / f"{name}-{args.image_size}px-{key}"
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", nc=10, verbose=False)
    if (folder / "model.safetensors").is_file():
        load_model(model, folder / "model.safetensors")
        return model.eval(), json.loads((folder / "train.json").read_text())["seconds"]
    t0 = time.perf_counter()
    model = yolo_train(model, data, args.epochs, args.batch_size, args.lr)
    seconds = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "train.json").write_text(json.dumps({"seconds": seconds, "epochs": args.epochs, **data}))
    return model, seconds


def head_outputs(model: nn.Module) -> set[str]:
    """Names of the Detect head's output convs (box / DFL, class outputs, ``dfl``): they keep their channels."""
    head = model.model[-1]
    prefix = next(n for n, m in model.named_modules() if m is head)
    out = {f"{prefix}.dfl.conv"}
    for b in ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3"):
        for i, branch in enumerate(getattr(head, b, None) or []):
            out.add(f"{prefix}.{b}.{i}.{len(branch) - 1}")
    return out


def convs_left_whole(dense: nn.Module, pruned: nn.Module) -> tuple[list[str], int]:
    """(convs of ``pruned`` outside the head's output layers with all of ``dense``'s output channels, how many)."""
    outs = head_outputs(dense)
    d = {n: m.out_channels for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and n not in outs}
    p = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    return [n for n in d if p.get(n) == d[n]], len(d)


def prune_method(method: str, dense: nn.Module, calib: Any, x: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """A pruned copy of ``dense`` (BatchNorm re-estimated on ``--calib-batches`` calibration batches)."""
    model = copy.deepcopy(dense).eval()
    if method == "anchor":
        return anchor(model, calib, x, args)
    loss = yolo_loss_fn(model) if method == "taylor" else None
    prunekit.prune(model, x, calib_data=calib, loss_fn=loss, target_macs=args.target_macs,
                   calib_batches=args.calib_batches, recalibrate_bn=True, **PRUNEKIT[method])
    return model


def anchor(model: nn.Module, calib: Any, x: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """torch-pruning's YOLOv8 procedure, one shot: C2f without its split (``C2f_v2``), Detect ignored, group L2
    magnitude; the ratio bisected until the MACs are within 1% of the target."""
    import torch_pruning as tp
    from ultralytics.nn.modules.head import Detect

    from prunekit.models.yolo_prunable import rewrite_yolo

    rewrite_yolo(model)  # = torch-pruning's replace_c2f_with_c2f_v2 (two convs instead of one conv + split)
    base, lo, hi = count_macs(model, x), 0.0, 0.95
    best: tuple[nn.Module, float] | None = None
    for _ in range(12):
        r = (lo + hi) / 2
        trial = copy.deepcopy(model)
        ignored = [m for m in trial.modules() if isinstance(m, Detect)]
        tp.pruner.MetaPruner(trial, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=r,
                             ignored_layers=ignored).step()
        kept = count_macs(trial, x) / base
        if best is None or abs(kept - args.target_macs) < abs(best[1] - args.target_macs):
            best = (trial, kept)
        if abs(kept - args.target_macs) < 0.01:
            break
        lo, hi = (r, hi) if kept > args.target_macs else (lo, r)
    model = best[0]
    recalibrate_bn(model, calib, max_batches=args.calib_batches)
    return model.eval()


def latency(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """ONNX Runtime, batch 1, one thread, the two models timed alternately: medians and 10th percentiles (ms) and
    the cut of each (on a shared machine the 10th percentile is the less disturbed figure)."""
    from prunekit.measure.latency import compare_latency, percentile

    models = {"dense": export_form(copy.deepcopy(dense)), "pruned": export_form(copy.deepcopy(pruned))}
    stats = compare_latency(models, x, backend="onnxruntime", runs=runs, warmup=50, threads=1, rounds=20)
    d, p = stats["dense"].median_ms, stats["pruned"].median_ms
    d10, p10 = (percentile(sorted(stats[k].times_ms), 10) for k in ("dense", "pruned"))
    return {"dense_ms": d, "pruned_ms": p, "latency_cut": 1 - p / d, "dense_p10_ms": d10, "pruned_p10_ms": p10,
            "latency_cut_p10": 1 - p10 / d10}


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = settings(args)
    dense, train_s = dense_model(name, data, args)
    test = split_dataset(data, "test")
    calib = loader(split_dataset(data, "calib"), args.batch_size, shuffle=True, seed=0)
    x = torch.rand(1, 3, args.image_size, args.image_size)
    base = {"model": name, "method": "dense", **test_detection(dense, test), "macs": count_macs(dense, x),
            "train_seconds": round(train_s, 1)}
    print(f"{name}: dense test mAP50-95 {base['map50_95']:.4f} mAP50 {base['map50']:.4f}, "
          f"{base['macs'] / 1e6:.1f} M MACs ({args.epochs} epochs, {train_s / 60:.1f} min)", flush=True)
    rows = [base]
    ft_epochs = args.ft_epochs or max(1, args.epochs // 10)
    for method in args.methods.split(","):
        try:
            rows.append(run_method(name, method, dense, calib, test, x, base, ft_epochs, data, args))
        except Exception as e:  # a method that cannot prune this model is a result too
            print(f"{name} {method:8s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"model": name, "method": method, "error": f"{type(e).__name__}: {e}"})
    return rows


def run_method(name: str, method: str, dense: nn.Module, calib: Any, test: Any, x: torch.Tensor,
               base: dict[str, Any], ft_epochs: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    pruned = prune_method(method, dense, calib, x, args)
    prune_s = time.perf_counter() - t0
    ref = copy.deepcopy(dense)
    from prunekit.pruning.structured.detect import make_yolo_prunable

    make_yolo_prunable(ref)  # the names of the rewritten blocks (cv1a / cv1b), as in every pruned copy
    whole, total = convs_left_whole(ref, pruned)
    after = test_detection(pruned, test)
    t0 = time.perf_counter()
    tuned = yolo_train(pruned, data, ft_epochs, args.batch_size, args.ft_lr)
    ft_s = time.perf_counter() - t0
    final = test_detection(tuned, test)
    macs = count_macs(tuned, x)
    lat = latency(dense, tuned, x, args.latency_runs)
    macs_cut = 1 - macs / base["macs"]
    row = {"model": name, "method": method, "macs_kept": macs / base["macs"], "convs_whole": len(whole),
           "convs": total, "whole": whole, "pruned_map50_95": after["map50_95"],
           "pruned_fraction": after["map50_95"] / base["map50_95"] if base["map50_95"] else None,
           "map50": final["map50"], "map50_95": final["map50_95"],
           "ft_drop_points": 100 * (base["map50_95"] - final["map50_95"]), "ft_epochs": ft_epochs, **lat,
           "latency_over_macs_cut": lat["latency_cut"] / macs_cut if macs_cut > 0 else None,
           "p10_over_macs_cut": lat["latency_cut_p10"] / macs_cut if macs_cut > 0 else None,
           "prune_seconds": round(prune_s, 1), "ft_seconds": round(ft_s, 1)}
    print(f"{name} {method:8s} MACs kept {row['macs_kept']:.3f}  convs whole {len(whole)}/{total}  "
          f"right after {after['map50_95']:.4f} ({_f(row['pruned_fraction'])} of dense)  after ft "
          f"{final['map50_95']:.4f} ({-row['ft_drop_points']:+.2f} pts)  ORT {lat['dense_ms']:.2f} -> "
          f"{lat['pruned_ms']:.2f} ms (cut {lat['latency_cut']:.2f} = {_f(row['latency_over_macs_cut'])} of the "
          f"MACs cut; p10 {lat['dense_p10_ms']:.2f} -> {lat['pruned_p10_ms']:.2f} ms = "
          f"{_f(row['p10_over_macs_cut'])})  prune {prune_s:.0f} s, ft {ft_s:.0f} s", flush=True)
    return row


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows = [r for name in args.models.split(",") for r in run_model(name, args)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
