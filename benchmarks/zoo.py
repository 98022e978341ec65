"""Model zoo coverage: prune every torchvision classification model (and a list of timm families, random weights)
at ratio 0.5 with prunekit's default settings, check a forward pass, and compare with torch-pruning's plain
``MetaPruner`` (L1 group magnitude, global, the classifier ignored) in the same run.

Usage::

    .venv/bin/python benchmarks/zoo.py                      # all torchvision models + the timm list
    .venv/bin/python benchmarks/zoo.py --tv resnet18,vit_b_16 --timm none --json zoo.json
    .venv/bin/python benchmarks/zoo.py --tv swin_t,shufflenet_v2_x0_5 --timm none --no-tp --onnx   # + ONNX verify

Columns: model, ok (prunekit: pruned and forward gives the right shape), MACs before/after (per sample, at the
input size shown), seconds (prunekit prune call), then the same for MetaPruner. Inputs are 64x64 where the model
allows it (see SIZES).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from prunekit import count_macs, create_model
from prunekit.pruning import prune

NUM_CLASSES = 10
DEFAULT_SIZE = 64
# models that need a bigger input than 64 px, or are built for one size
SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 224, "efficientnet_b7": 64}
KWARGS = {n: {"image_size": 64} for n in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")}
TIMM = ["resnet18", "resnet50d", "resnext50_32x4d", "seresnet50", "efficientnet_b0", "mobilenetv3_large_100",
        "mobilenetv4_conv_small", "regnety_002", "convnext_atto", "convnextv2_atto", "densenet121", "dla34",
        "ghostnet_100", "hrnet_w18_small", "rexnet_100", "repvgg_a0", "cspresnet50", "dpn68", "vit_tiny_patch16_224",
        "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "efficientformer_l1", "levit_128s", "mixer_b16_224",
        "resmlp_12_224", "poolformer_s12", "coat_lite_tiny", "pvt_v2_b0", "mobilevit_xxs", "edgenext_xx_small"]
TIMM_SIZES = {"swin_tiny_patch4_window7_224": 224, "levit_128s": 224, "mixer_b16_224": 224, "resmlp_12_224": 224,
              "coat_lite_tiny": 224, "efficientformer_l1": 224, "vit_tiny_patch16_224": 224,
              "deit_tiny_patch16_224": 224, "mobilevit_xxs": 256}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    family, ref = name.split(":", 1)
    size = (SIZES if family == "tv" else TIMM_SIZES).get(ref, DEFAULT_SIZE)
    model = create_model(name, in_channels=3, num_classes=NUM_CLASSES, **KWARGS.get(ref, {})).eval()
    return model, torch.randn(1, 3, size, size)


def out_shape_ok(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        y = model(x)
    return tuple(y.shape) == (1, NUM_CLASSES)


def run_prunekit(name: str, ratio: float, heads: bool = False, onnx: bool = False, seed: int = 0) -> dict[str, Any]:
    model, x = build(name, seed)
    row: dict[str, Any] = {"size": x.shape[-1], "macs_before": count_macs(model, x)}
    t = time.perf_counter()
    try:
        report = prune(model, x, ratio=ratio, heads=heads)
        row["seconds"] = time.perf_counter() - t
        row["ok"] = out_shape_ok(model, x)
        row["macs_after"] = report.macs_after
        row["left_whole"] = len(report.left_whole)
        if not row["ok"]:
            row["error"] = "wrong output shape"
        elif onnx:
            row.update(onnx_check(model, x))
    except Exception as e:
        row.update(ok=False, seconds=time.perf_counter() - t, error=f"{type(e).__name__}: {str(e)[:300]}")
    return row


def onnx_check(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Export the pruned model to ONNX (prunekit's default exporter, dynamic batch; exported at batch 2) and compare
    ONNX Runtime with torch on 3 fresh inputs."""
    import tempfile

    from prunekit.export import export_model

    t = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as d:
            batch = torch.randn(2, *x.shape[1:])
            v = export_model(model, batch, d, ["onnx"], verify_inputs=torch.randn(3, *x.shape[1:]))
            v = v["formats"]["onnx"]["verify"]
        return {"onnx_ok": bool(v["ok"]), "onnx_diff": v["max_abs_diff"], "onnx_seconds": time.perf_counter() - t}
    except Exception as e:
        return {"onnx_ok": False, "onnx_error": f"{type(e).__name__}: {str(e)[:200]}",
                "onnx_seconds": time.perf_counter() - t}


def run_metapruner(name: str, ratio: float) -> dict[str, Any]:
    model, x = build(name)
    heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and
             getattr(m, "out_features", getattr(m, "out_channels", None)) == NUM_CLASSES]
    t = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=True, ignored_layers=heads)
        pruner.step()
        row = {"tp_seconds": time.perf_counter() - t, "tp_ok": out_shape_ok(model, x),
               "tp_macs_after": count_macs(model, x)}
    except Exception as e:
        row = {"tp_ok": False, "tp_seconds": time.perf_counter() - t, "tp_error": f"{type(e).__name__}: {str(e)[:200]}"}
    return row


def run_column(name: str, ratio: float, column: str, heads: bool = False, onnx: bool = False,
               seed: int = 0) -> dict[str, Any]:
    """One column for one model: ``pk`` (prunekit) or ``tp`` (torch-pruning MetaPruner)."""
    try:
        return run_prunekit(name, ratio, heads, onnx, seed) if column == "pk" else run_metapruner(name, ratio)
    except Exception as e:  # the model itself could not be built
        key = "error" if column == "pk" else "tp_error"
        return {"ok" if column == "pk" else "tp_ok": False, key: f"build: {type(e).__name__}: {str(e)[:200]}"}


def run_isolated(name: str, ratio: float, column: str, timeout: int, flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """One column in a fresh process: torch-pruning can hang on some graphs, and memory is returned."""
    cmd = [sys.executable, __file__, "--one", name, "--column", column, "--ratio", str(ratio), *flags]
    ok, err = ("ok", "error") if column == "pk" else ("tp_ok", "tp_error")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {ok: False, err: f"timeout after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {ok: False, err: f"crashed: {res.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tv", default="all", help="'all', 'none' or comma-separated torchvision names")
    p.add_argument("--timm", default="all", help="'all', 'none' or comma-separated timm names")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--no-tp", action="store_true", help="skip the torch-pruning MetaPruner column")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per model and column")
    p.add_argument("--seed", type=int, default=0, help="prunekit column: seed of the random weights and inputs")
    p.add_argument("--heads", action="store_true", help="prunekit column: also remove whole attention heads")
    p.add_argument("--onnx", action="store_true", help="prunekit column: export each pruned model to ONNX and "
                   "verify it with ONNX Runtime against torch")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model's column, print it as JSON
    p.add_argument("--column", default="pk", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(run_column(args.one, args.ratio, args.column, args.heads, args.onnx, args.seed), default=str))
        return 0
    tv = (torchvision.models.list_models(module=torchvision.models) if args.tv == "all"
          else [] if args.tv == "none" else args.tv.split(","))
    tm = TIMM if args.timm == "all" else [] if args.timm == "none" else args.timm.split(",")
    names = [f"tv:{n}" for n in sorted(tv)] + [f"timm:{n}" for n in tm]
    rows = []
    print(f"{'model':36s} {'px':>4s} {'ok':>3s} {'MACs before':>12s} {'after':>10s} {'kept':>6s} {'s':>6s} | "
          f"{'tp ok':>5s} {'tp after':>10s} {'tp s':>6s}")
    for name in names:
        flags = (*(f for f, on in (("--heads", args.heads), ("--onnx", args.onnx)) if on), "--seed", str(args.seed))
        row = {"model": name, **run_isolated(name, args.ratio, "pk", args.timeout, flags)}
        if not args.no_tp:
            row.update(run_isolated(name, args.ratio, "tp", args.timeout))
        rows.append(row)
        mb, ma, tma = row.get("macs_before"), row.get("macs_after"), row.get("tp_macs_after")
        fmt = lambda v: f"{v / 1e6:10.1f}M" if v else f"{'-':>11s}"  # noqa: E731
        kept = f"{ma / mb:6.2f}" if ma and mb else f"{'-':>6s}"
        print(f"{name:36s} {row.get('size', 0):4d} {'yes' if row['ok'] else 'NO':>3s} {fmt(mb):>12s} {fmt(ma)} "
              f"{kept} {row.get('seconds', 0):6.1f} | {'yes' if row.get('tp_ok') else 'NO':>5s} {fmt(tma)} "
              f"{row.get('tp_seconds', 0):6.1f}", flush=True)
        if not row["ok"]:
            print(f"    prunekit: {row.get('error')}", flush=True)
        if "onnx_ok" in row:
            print(f"    ONNX: {'verified' if row['onnx_ok'] else 'FAILED'} (max abs diff {row.get('onnx_diff')}, "
                  f"{row['onnx_seconds']:.1f} s){' ' + row['onnx_error'] if 'onnx_error' in row else ''}", flush=True)
        if row.get("left_whole"):
            print(f"    prunekit: {row['left_whole']} group(s) left whole", flush=True)
        if row.get("tp_error"):
            print(f"    MetaPruner: {row['tp_error']}", flush=True)
    n_ok = sum(r["ok"] and r.get("onnx_ok", True) for r in rows)
    n_tp = sum(bool(r.get("tp_ok")) for r in rows)
    tp_note = "" if args.no_tp else f"; torch-pruning MetaPruner: {n_tp}/{len(rows)} ok"
    print(f"\nprunekit: {n_ok}/{len(rows)} ok{tp_note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
