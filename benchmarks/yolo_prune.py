"""YOLO pruned to half its MACs on the generated detection set: prunekit's criteria against torch-pruning's procedure.

A YOLOv8n (``--models yolov8n,yolo11n`` for both) is trained once with Ultralytics' trainer on ``fashion-detect`` (the
generated Fashion-MNIST detection set, ``--image-size`` px) and cached under ``~/.cache/prunekit/bench/yolo`` with
its val curve. Each method then prunes a copy to ``--target-macs`` of the MACs with calibration on the train images
(BatchNorm re-estimated on the same batches for every method), and every pruned model gets the same short fine-tune
(``--ft-epochs``, default 10% of the baseline's epochs, Ultralytics' trainer keeping the pruned widths) with one
recipe of ``RECIPES`` (``--ft-recipe``; ``--choose-recipe`` fine-tunes ``variance`` with each and keeps the best on
the **val** split, Ultralytics' per-epoch validation, for all methods; test only reports):

- ``variance``: ``prunekit.prune(criterion="variance", compensate="lstsq")`` (the library's default with data);
- ``l1``: ``criterion="l1"``, no compensation;
- ``taylor``: ``criterion="taylor"`` with Ultralytics' detection loss (``prunekit.pipeline.detect.yolo_loss_fn``);
- ``anchor``: torch-pruning's own YOLOv8 procedure (its ``examples/yolov8``): C2f replaced by a split-free equal
  block (torch-pruning's ``C2f_v2``; here prunekit's identical rewrite, because torch-pruning 1.6 fails with an
  ``IndexError`` on Ultralytics 8.4's C2f as it is), the whole Detect head ignored, ``MetaPruner`` +
  ``GroupMagnitudeImportance(p=2)``, one shot, its ratio searched to the same MACs target.

Printed per method: MACs kept; convolutions outside the head's output layers (box / DFL / class convs) that kept all
their channels; test mAP50-95 (COCO AP, ``prunekit.pipeline.detect.test_detection``) right after pruning as a
fraction of the dense model's and after the fine-tune (points against dense, with the fine-tune's val figure); ONNX
Runtime latency at batch 1 at each ``--latency-size`` (default the training size; same weights, YOLO is fully
convolutional), timed alternately with the dense model (one thread): medians, 10th percentiles, and the latency cut
as a fraction of the MACs cut at that size.

Every pruned and every fine-tuned model is cached beside the baseline (``prunekit.save_model``: safetensors +
``model.json``, rebuilt by ``prunekit.load_model``), with its figures (``info.json``): a second run reuses them, so
the accuracy part runs once (``--no-latency``) and the timing later on a quiet machine (``--only-latency``).

    OMP_NUM_THREADS=1 python benchmarks/yolo_prune.py --choose-recipe --no-latency --out yolo.json
    OMP_NUM_THREADS=1 python benchmarks/yolo_prune.py --ft-recipe warmup --only-latency --latency-size 64,320,640 \
        --out yolo-latency.json
"""

from __future__ import annotations

import argparse
import copy
import csv
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
# fine-tune recipes (AdamW, no mosaic; the same for every method): Ultralytics train arguments; "kd" the weight
# (Ultralytics' `dis`) of the distillation from the dense model (0: none), "kd_mode" its kind (prunekit's "head":
# the head's outputs; Ultralytics' "features": the head's input features through a learned projector).
# --choose-recipe fine-tunes `variance` with each and keeps the best on the val split (never test).
RECIPES: dict[str, dict[str, Any]] = {
    "warmup": {"lr0": 0.001, "warmup_epochs": 1, "kd": 0.0},  # the first recipe of docs/benchmarks/yolo.md
    "lr5e-4": {"lr0": 0.0005, "warmup_epochs": 0, "kd": 0.0},
    "lr2e-4": {"lr0": 0.0002, "warmup_epochs": 0, "kd": 0.0},
    "lr2e-3": {"lr0": 0.002, "warmup_epochs": 1, "kd": 0.0},
    "warmup-kd-features": {"lr0": 0.001, "warmup_epochs": 1, "kd": 6.0, "kd_mode": "features"},
    "lr5e-4-kd-features": {"lr0": 0.0005, "warmup_epochs": 0, "kd": 6.0, "kd_mode": "features"},
    "warmup-kd-head": {"lr0": 0.001, "warmup_epochs": 1, "kd": 1.0, "kd_mode": "head"},
    "warmup-kd-head3": {"lr0": 0.001, "warmup_epochs": 1, "kd": 3.0, "kd_mode": "head"},
    "lr5e-4-kd-head3": {"lr0": 0.0005, "warmup_epochs": 0, "kd": 3.0, "kd_mode": "head"},
}
DEFAULT_RECIPE = "warmup"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="yolov8n", help="comma-separated Ultralytics yaml stems")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs (cached)")
    p.add_argument("--lr", type=float, default=0.002, help="AdamW learning rate of the baseline's training")
    p.add_argument("--ft-recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES), help="the fine-tune recipe")
    p.add_argument("--choose-recipe", action="store_true", help="fine-tune `variance` with every recipe of "
                   "--recipes, keep the best on val for all methods")
    p.add_argument("--recipes", default=",".join(RECIPES), help="the candidates of --choose-recipe")
    p.add_argument("--ft-epochs", type=int, default=None, help="fine-tune epochs (default: 10%% of --epochs, >= 1)")
    p.add_argument("--train-samples", type=int, default=1000, help="training images (of fashion-detect's 1000)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=None, help="prunekit methods: kept channels a multiple of this "
                   "(16 = ONNX Runtime's block on AVX-512: latency cut 0.93-0.97 of the MACs cut; default: unrounded)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--latency-size", default=None, help="comma-separated image sizes of the ONNX Runtime timing "
                   "(default: --image-size), e.g. 64,320,640: same weights, YOLO is fully convolutional")
    p.add_argument("--latency-runs", type=int, default=1000, help="timed runs per model (20 alternating rounds)")
    p.add_argument("--no-latency", action="store_true", help="accuracy only (no timing)")
    p.add_argument("--only-latency", action="store_true", help="time the cached fine-tuned models only (no "
                   "training, pruning or fine-tune: run the accuracy part first)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"dataset": "fashion-detect", "data_dir": None, "image_size": args.image_size,
            "train_samples": args.train_samples}


def yolo_train(model: nn.Module, data: dict[str, Any], epochs: int, batch: int, recipe: dict[str, Any],
               teacher: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Ultralytics' trainer (its loss, EMA, schedule; val picks the epoch), pruned widths kept, AdamW (its ``auto``
    choice is made for pretrained weights), no mosaic (four 64 px images in one shrink the objects to a few
    pixels); ``recipe``: Ultralytics train arguments, ``kd`` the distillation weight from ``teacher``. Returns (the
    model, its val figures: mAP50-95 of each epoch and of the one kept)."""
    from prunekit.models.ultralytics_io import finetune_yolo

    kd = float(recipe.get("kd", 0.0))
    extra = {k: v for k, v in recipe.items() if k not in ("kd", "kd_mode")}
    if kd > 0:
        extra.update(dis=kd, kd=recipe.get("kd_mode", "head"))
    with tempfile.TemporaryDirectory(prefix="yolo-bench-") as tmp:
        trained, metrics = finetune_yolo(model, data_yaml(data, Path(tmp)), epochs=epochs, imgsz=data["image_size"],
                                         batch=batch, workers=0, plots=False, amp=False, seed=0, deterministic=True,
                                         verbose=False, optimizer="AdamW", mosaic=0.0, project=tmp, name="run",
                                         teacher=teacher if kd > 0 else None, **extra)
        with open(Path(tmp) / "run" / "results.csv") as f:
            curve = [float(next(v for k, v in r.items() if "mAP50-95" in k)) for r in csv.DictReader(f)]
    val = {"val_curve": [round(v, 4) for v in curve], "val_map50_95": metrics.get("metrics/mAP50-95(B)")}
    return trained.float().eval(), val


def dense_model(name: str, data: dict[str, Any], args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], Path]:
    """The trained dense model (cached: safetensors of the plain Ultralytics model), its training record (seconds,
    val curve) and its cache folder."""
    from safetensors.torch import load_model, save_model
    from ultralytics.nn.tasks import DetectionModel

    key = hashlib.sha1(json.dumps([name, data, args.epochs, args.batch_size, args.lr]).encode()).hexdigest()[:10]
    folder = CACHE / f"{name}-{args.image_size}px-{key}"
    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", nc=10, verbose=False)
    if (folder / "model.safetensors").is_file():
        load_model(model, folder / "model.safetensors")
        return model.eval(), json.loads((folder / "train.json").read_text()), folder
    if args.only_latency:
        raise SystemExit(f"--only-latency: no cached {name} baseline in {folder}; run without it first")
    t0 = time.perf_counter()
    model, val = yolo_train(model, data, args.epochs, args.batch_size, {"lr0": args.lr, "warmup_epochs": 1})
    record = {"seconds": time.perf_counter() - t0, "epochs": args.epochs, **val, **data}
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "train.json").write_text(json.dumps(record))
    return model, record, folder


def cached(folder: Path, name: str, make: Any, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """``make() -> (model, info)`` once: the model kept in ``folder`` as safetensors + prunekit's ``model.json``
    (``prunekit.load_model`` rebuilds it), ``info`` as ``info.json``."""
    if (folder / "info.json").is_file():
        return prunekit.load_model(folder).eval(), json.loads((folder / "info.json").read_text())
    if args.only_latency:
        raise SystemExit(f"--only-latency: {folder} is not cached; run the same command without it first")
    model, info = make()
    ref = prunekit.create_model(f"ultralytics:{name}.yaml", num_classes=10, image_size=args.image_size)
    model.prunekit_spec = ref.prunekit_spec  # rebuilt as Ultralytics' yaml with prunekit's block rewrite
    prunekit.save_model(folder, model)
    (folder / "info.json").write_text(json.dumps(info))
    return model, info


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


def _rounded(a: argparse.Namespace) -> str:
    """The cache-name part of ``--round-to`` (nothing when unrounded, so earlier caches stay valid)."""
    return f"-round{a.round_to}" if a.round_to else ""


def prune_method(method: str, dense: nn.Module, calib: Any, x: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """A pruned copy of ``dense`` (BatchNorm re-estimated on ``--calib-batches`` calibration batches)."""
    model = copy.deepcopy(dense).eval()
    if method == "anchor":
        return anchor(model, calib, x, args)
    loss = yolo_loss_fn(model) if method == "taylor" else None
    prunekit.prune(model, x, calib_data=calib, loss_fn=loss, target_macs=args.target_macs,
                   calib_batches=args.calib_batches, recalibrate_bn=True, round_to=args.round_to, **PRUNEKIT[method])
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


def latency(dense: nn.Module, pruned: nn.Module, size: int, runs: int) -> dict[str, float]:
    """ONNX Runtime, batch 1 at ``size`` px, one thread, the two models timed alternately: medians and 10th
    percentiles (ms), the cut of each (on a shared machine the 10th percentile is the less disturbed figure) and
    the MACs cut at that size."""
    from prunekit.measure.latency import compare_latency, percentile

    x = torch.rand(1, 3, size, size)
    models = {"dense": export_form(copy.deepcopy(dense)), "pruned": export_form(copy.deepcopy(pruned))}
    stats = compare_latency(models, x, backend="onnxruntime", runs=runs, warmup=50, threads=1, rounds=20)
    d, p = stats["dense"].median_ms, stats["pruned"].median_ms
    d10, p10 = (percentile(sorted(stats[k].times_ms), 10) for k in ("dense", "pruned"))
    macs_cut = 1 - count_macs(pruned, x) / count_macs(dense, x)
    return {"size": size, "macs_cut": macs_cut, "dense_ms": d, "pruned_ms": p, "latency_cut": 1 - p / d,
            "dense_p10_ms": d10, "pruned_p10_ms": p10, "latency_cut_p10": 1 - p10 / d10,
            "latency_over_macs_cut": (1 - p / d) / macs_cut, "p10_over_macs_cut": (1 - p10 / d10) / macs_cut}


class Bench:
    """One model's benchmark: the dense model, its data, and the cached pruned / fine-tuned copies."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args, self.data = name, args, settings(args)
        self.dense, self.record, self.folder = dense_model(name, self.data, args)
        self.x = torch.rand(1, 3, args.image_size, args.image_size)
        self.ft_epochs = args.ft_epochs or max(1, args.epochs // 10)
        self._test = self._calib = None

    def test(self, model: nn.Module) -> dict[str, Any]:
        if self._test is None:
            self._test = split_dataset(self.data, "test")
        return test_detection(model, self._test)

    def pruned(self, method: str) -> tuple[nn.Module, dict[str, Any]]:
        """``method``'s pruned copy right after pruning (BatchNorm re-estimated), cached; info: convs left whole,
        test mAP right after, seconds."""
        a = self.args

        def make() -> tuple[nn.Module, dict[str, Any]]:
            if self._calib is None:
                self._calib = loader(split_dataset(self.data, "calib"), a.batch_size, shuffle=True, seed=0)
            t0 = time.perf_counter()
            model = prune_method(method, self.dense, self._calib, self.x, a)
            seconds = time.perf_counter() - t0
            from prunekit.pruning.structured.detect import make_yolo_prunable

            ref = copy.deepcopy(self.dense)
            make_yolo_prunable(ref)  # the names of the rewritten blocks (cv1a / cv1b), as in every pruned copy
            whole, total = convs_left_whole(ref, model)
            return model, {"whole": whole, "convs": total, "prune_seconds": round(seconds, 1),
                           "pruned_map50_95": self.test(model)["map50_95"]}

        stem = f"{method}-macs{a.target_macs}-calib{a.calib_batches}{_rounded(a)}"
        return cached(self.folder / stem, self.name, make, a)

    def tuned(self, method: str, recipe: str) -> tuple[nn.Module, dict[str, Any]]:
        """``method``'s pruned copy after the fine-tune ``recipe``, cached; info: val curve and the kept epoch's
        val mAP50-95, test mAP50 / mAP50-95, seconds."""
        a, spec = self.args, RECIPES[recipe]
        key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:6]
        stem = f"{method}-macs{a.target_macs}-calib{a.calib_batches}{_rounded(a)}"
        folder = self.folder / f"{stem}-{recipe}-{key}-{self.ft_epochs}ep"

        def make() -> tuple[nn.Module, dict[str, Any]]:
            pruned, _ = self.pruned(method)
            t0 = time.perf_counter()
            model, val = yolo_train(pruned, self.data, self.ft_epochs, a.batch_size, spec, teacher=self.dense)
            final = self.test(model)
            return model, {**val, "ft_seconds": round(time.perf_counter() - t0, 1), "map50": final["map50"],
                           "map50_95": final["map50_95"]}

        return cached(folder, self.name, make, a)

    def choose_recipe(self) -> tuple[str, dict[str, float]]:
        """The recipe whose `variance` fine-tune reaches the best val mAP50-95 (the kept epoch's), and each one's."""
        vals = {}
        for recipe in self.args.recipes.split(","):
            info = self.tuned("variance", recipe)[1]
            vals[recipe] = info["val_map50_95"]
            print(f"{self.name} recipe {recipe:14s} {json.dumps(RECIPES[recipe])}: variance val mAP50-95 "
                  f"{info['val_map50_95']:.4f} (per epoch {info['val_curve']})", flush=True)
        best = max(vals, key=vals.get)
        print(f"{self.name}: chosen on val: {best}", flush=True)
        return best, vals


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    b = Bench(name, args)
    base = {"model": name, "method": "dense", "macs": count_macs(b.dense, b.x), "train_seconds": b.record["seconds"],
            "val_curve": b.record.get("val_curve")}
    if not args.only_latency:
        base.update(b.test(b.dense))
        print(f"{name}: dense test mAP50-95 {base['map50_95']:.4f} mAP50 {base['map50']:.4f}, {base['macs'] / 1e6:.1f}"
              f" M MACs ({args.epochs} epochs, {base['train_seconds'] / 60:.1f} min)", flush=True)
    recipe = args.ft_recipe
    if args.choose_recipe:
        recipe, base["recipe_val"] = b.choose_recipe()
    base["recipe"] = {"name": recipe, **RECIPES[recipe], "epochs": b.ft_epochs}
    rows = [base]
    for method in args.methods.split(","):
        try:
            rows.append(run_method(b, method, recipe, base))
        except Exception as e:  # a method that cannot prune this model is a result too
            print(f"{name} {method:8s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"model": name, "method": method, "error": f"{type(e).__name__}: {e}"})
    return rows


def run_method(b: Bench, method: str, recipe: str, base: dict[str, Any]) -> dict[str, Any]:
    _, pinfo = b.pruned(method)
    tuned, tinfo = b.tuned(method, recipe)
    macs = count_macs(tuned, b.x)
    row = {"model": b.name, "method": method, "recipe": recipe, "ft_epochs": b.ft_epochs,
           "macs_kept": macs / base["macs"], "convs_whole": len(pinfo["whole"]), **pinfo, **tinfo}
    if "map50_95" in base:
        row["pruned_fraction"] = pinfo["pruned_map50_95"] / base["map50_95"] if base["map50_95"] else None
        row["ft_drop_points"] = 100 * (base["map50_95"] - tinfo["map50_95"])
        print(f"{b.name} {method:8s} MACs kept {row['macs_kept']:.3f}  convs whole {len(pinfo['whole'])}/"
              f"{pinfo['convs']}  right after {pinfo['pruned_map50_95']:.4f} ({_f(row['pruned_fraction'])} of dense)"
              f"  after ft ({recipe}, {b.ft_epochs} epochs) val {tinfo['val_map50_95']:.4f} test "
              f"{tinfo['map50_95']:.4f} ({-row['ft_drop_points']:+.2f} pts)  prune {pinfo['prune_seconds']:.0f} s, "
              f"ft {tinfo['ft_seconds']:.0f} s", flush=True)
    if not b.args.no_latency:
        sizes = [int(v) for v in (b.args.latency_size or str(b.args.image_size)).split(",")]
        row["latency"] = [latency(b.dense, tuned, size, b.args.latency_runs) for size in sizes]
        for lat in row["latency"]:
            print(f"{b.name} {method:8s} ORT at {lat['size']} px: MACs cut {lat['macs_cut']:.3f}  median "
                  f"{lat['dense_ms']:.2f} -> {lat['pruned_ms']:.2f} ms (cut {lat['latency_cut']:.2f} = "
                  f"{_f(lat['latency_over_macs_cut'])} of the MACs cut)  p10 {lat['dense_p10_ms']:.2f} -> "
                  f"{lat['pruned_p10_ms']:.2f} ms (= {_f(lat['p10_over_macs_cut'])})", flush=True)
    return row


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.only_latency and args.no_latency:
        raise SystemExit("--only-latency and --no-latency: choose one")
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes {','.join(unknown)}: no such recipe; valid: {', '.join(RECIPES)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows = [r for name in args.models.split(",") for r in run_model(name, args)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
