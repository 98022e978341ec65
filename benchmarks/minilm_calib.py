"""MiniLM-L6 FFN pruning without fine-tuning, calibrated on the user's own text: how the figure depends on the
calibration size and domain.

Text this benchmark was not written for, from real human-written domains found offline on a Debian machine:

- ``debian``: long descriptions of the installed Debian packages (``/var/lib/dpkg/status``);
- ``man``: prose of the section-1 man pages (``/usr/share/man/man1``, roff macros stripped);
- ``docstrings``: docstrings of Python's standard library;
- ``fortunes``: the Debian ``fortunes`` package (quotes, jokes, verse; ``apt-get install fortunes``).

Each domain's sentences (6-40 words, mostly letters) are split by a hash of the sentence into a held-out evaluation
set (``--eval`` sentences) and a disjoint calibration pool; a draw ``d`` calibrates on ``N`` sentences of the pool
shuffled with seed ``d``. Score: mean cosine between the pruned and the dense model's mean-pooled embeddings on the
held-out sentences of the same domain (the "own" table, mean and min-max over draws); at the largest ``N`` the pruned
model is scored on every domain's held-out set (the cross-domain table: calibrate on the row, evaluate on the column).
``mlp-only`` (the six ``intermediate.dense -> output.dense`` FFNs), no fine-tuning. Method 4 adds block-wise
reconstruction (``reconstruct_steps``: each pruned transformer layer fitted to the dense layer's output on the
calibration sentences, error-correcting, no labels; ``prunekit.pruning.structured.reconstruct``); method 5 fits
longer on the calibration sentences plus four ``token_noise`` copies of each batch (``reconstruct_augment``).
Method 7 is the quick path: method 2 plus the closed-form, error-correcting refit of each FFN's ``output.dense``
(``prunekit.pruning.structured.reconstruct_closed``, seconds); method 8 adds 200 reconstruction steps after it.
``--tune N`` scores a validation part of the pool too (choose settings on it, never on the evaluation set).

    python benchmarks/minilm_calib.py --threads 1            # default grid, about an hour on one core
    python benchmarks/minilm_calib.py --threads 1 --sizes 100,300 --draws 1   # quick version (~15 minutes)
    python benchmarks/minilm_calib.py --threads 1 --domains debian,man,docstrings,fortunes --sizes 100,300,600,1500 \
        --draws 3 --methods 0,1,2,3                          # the bigger grid (hours)
    python benchmarks/minilm_calib.py --threads 1 --sizes 150,600 --methods 2,4   # reconstruction (about an hour)
    python benchmarks/minilm_calib.py --threads 1 --sizes 600 --methods 5 --calib-domains fortunes  # ~45 minutes
    python benchmarks/minilm_calib.py --threads 1 --domains man --sizes 300 --draws 1 --methods 2,7 --tune 200
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vbp_bert import FORTUNES, SENTENCES, Embedder, batches, docstring_texts, embed, minilm_path

from prunekit.pruning import prune
from prunekit.pruning.structured.reconstruct import blocks_of, reconstruct
from prunekit.pruning.structured.reconstruct_closed import RIDGE, WEIGHTS, consumers_of, refit_consumers

DPKG_STATUS = Path("/var/lib/dpkg/status")
MAN1 = Path("/usr/share/man/man1")


def _sentences(texts: Iterable[str]) -> set[str]:
    """English sentences of 6-40 words, >90% letters/spaces, capitalised, ending in . ? or !"""
    out: set[str] = set()
    for text in texts:
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = sent.split()
            letters = sum(c.isalpha() or c.isspace() for c in sent) / max(1, len(sent))
            if 6 <= len(words) <= 40 and letters > 0.9 and sent[0].isupper() and sent[-1] in ".?!":
                out.add(sent)
    return out


def debian_texts() -> Iterable[str]:
    """Long descriptions of the installed Debian packages (``/var/lib/dpkg/status``; the apt lists of this machine
    carry only the one-line synopses)."""
    if not DPKG_STATUS.is_file():
        raise SystemExit(f"domain debian: {DPKG_STATUS} not found")
    for stanza in DPKG_STATUS.read_text(encoding="utf-8", errors="ignore").split("\n\n"):
        lines = stanza.splitlines()
        for i, ln in enumerate(lines):
            if ln.startswith("Description:"):  # synopsis line, then " text" / " ." continuation lines
                body = []
                for cont in lines[i + 1:]:
                    if not cont.startswith(" "):
                        break
                    body.append("\n" if cont.strip() == "." else cont.strip())
                yield from " ".join(body).split("\n")


_ROFF = re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\\(..|\\\*(\(..|\[[^]]*\]|.)|\\s[-+]?\d+|\\[-&e|^%c0 ]")


def man_texts() -> Iterable[str]:
    if not MAN1.is_dir():
        raise SystemExit(f"domain man: {MAN1} not found")
    for f in sorted(MAN1.glob("*.gz")):
        if int(hashlib.sha1(f.name.encode()).hexdigest(), 16) % 3:  # a third of the pages is plenty
            continue
        try:
            raw = gzip.decompress(f.read_bytes()).decode("utf-8", "ignore")
        except (OSError, EOFError):
            continue
        para: list[str] = []
        for ln in raw.splitlines():
            if ln.startswith((".", "'")):  # a macro line ends a paragraph (its arguments are mostly markup)
                if para:
                    yield " ".join(para)
                para = []
            else:
                para.append(_ROFF.sub("", ln).replace("\\", ""))
        if para:
            yield " ".join(para)


def fortune_texts() -> Iterable[str]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"domain fortunes: {FORTUNES} not found (apt-get install fortunes)")
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix in (".dat", ".u8") or not f.is_file() or f.is_symlink():
            continue
        for cookie in f.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
            yield " ".join(ln for ln in cookie.splitlines() if not ln.strip().startswith("--"))


DOMAINS: dict[str, Callable[[], Iterable[str]]] = {
    "debian": debian_texts, "man": man_texts, "docstrings": docstring_texts, "fortunes": fortune_texts}

RECONSTRUCT_STEPS = 800  # --reconstruct-steps; its step size is the default reconstruct_lr
AUGMENTED_STEPS = 1600  # with augmentation (more distinct batches to fit)
AUGMENT = 4  # --reconstruct-augment: token_noise copies of every calibration batch
REFIT_RECONSTRUCT = 200  # method 8: reconstruction steps per block after the closed-form refit
BLOCK_AUGMENT, INPUT_MIX = 16, 0.5  # method 6: every parameter of each block, 16 copies, dense inputs mixed in
METHODS = [  # (label, criterion, compensate, scope, reconstruct_steps, reconstruct_augment[, extra prune() kwargs])
    ("variance + mean", "variance", "mean", "local", 0, 0),
    ("variance + lstsq", "variance", "lstsq", "local", 0, 0),
    ("variance_conditional + lstsq", "variance_conditional", "lstsq", "local", 0, 0),
    ("variance_conditional + lstsq, adaptive", "variance_conditional", "lstsq", "adaptive", 0, 0),
    ("variance_conditional + lstsq + reconstruct", "variance_conditional", "lstsq", "local", RECONSTRUCT_STEPS, 0),
    (f"... + reconstruct {AUGMENTED_STEPS}, augment {AUGMENT}", "variance_conditional", "lstsq", "local",
     AUGMENTED_STEPS, AUGMENT),
    (f"... + reconstruct {AUGMENTED_STEPS} whole blocks, augment {BLOCK_AUGMENT}, input mix {INPUT_MIX}",
     "variance_conditional", "lstsq", "local", AUGMENTED_STEPS, BLOCK_AUGMENT,
     {"reconstruct_train": "block", "reconstruct_input_mix": INPUT_MIX}),
    ("variance_conditional + lstsq + refit", "variance_conditional", "lstsq", "local", 0, 0, {"refit": True}),
    (f"... + refit + reconstruct {REFIT_RECONSTRUCT}", "variance_conditional", "lstsq", "local", 0, 0,
     {"refit": True, "then_reconstruct": REFIT_RECONSTRUCT}),
]


def _hash(s: str) -> int:
    return int(hashlib.sha1(s.encode("utf-8")).hexdigest(), 16)


def split_domain(name: str, n_eval: int, n_pool: int) -> tuple[list[str], list[str]]:
    """(calibration pool, held-out eval sentences) of a domain, disjoint, both chosen by a hash of the sentence
    (not by anything measured); the benchmark's own hand-written sentences are left out."""
    sents = sorted(_sentences(DOMAINS[name]()) - set(SENTENCES), key=_hash)
    if len(sents) < n_eval + n_pool:
        raise SystemExit(f"domain {name}: {len(sents)} sentences, fewer than --eval {n_eval} + {n_pool} needed")
    held, pool = sents[:n_eval], sents[n_eval:]  # the smallest hashes are held out
    return pool, held


def tokens(data: list[dict]) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="debian,man,fortunes", help="comma list of " + ", ".join(DOMAINS))
    ap.add_argument("--calib-domains", default="", help="calibrate on these domains only (default: every --domains; "
                    "the held-out sets of all --domains are still scored at the largest N); to split a run in parts")
    ap.add_argument("--sizes", default="50,100,300,600", help="calibration sentences per run (N)")
    ap.add_argument("--keeps", default="0.5,0.3", help="fractions of FFN hidden units kept")
    ap.add_argument("--draws", type=int, default=2, help="calibration draws (seeds) per setting")
    ap.add_argument("--first-draw", type=int, default=0, help="seed of the first draw (draws first-draw .. "
                    "first-draw + draws - 1); to split a run in parts")
    ap.add_argument("--methods", default="0,1,2",
                    help="indices: " + "; ".join(f"{i}={m[0]}" for i, m in enumerate(METHODS)))
    ap.add_argument("--eval", type=int, default=200, help="held-out sentences per domain")
    ap.add_argument("--tune", type=int, default=0, help="also score on this many pool sentences kept out of every "
                    "calibration draw (the last of the pool; a validation set to choose settings on, never --eval)")
    ap.add_argument("--refit-ridge", type=float, default=RIDGE, help="methods 7-8: ridge of the closed-form refit")
    ap.add_argument("--refit-weight", default="norm", choices=WEIGHTS, help="methods 7-8: token weights of the refit")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    domains = [d.strip() for d in a.domains.split(",") if d.strip()]
    bad = [d for d in domains if d not in DOMAINS]
    if bad:
        raise SystemExit(f"--domains: unknown {bad}; choose from {', '.join(DOMAINS)}")
    calib_domains = [d.strip() for d in a.calib_domains.split(",") if d.strip()] or domains
    if set(calib_domains) - set(domains):
        raise SystemExit(f"--calib-domains {a.calib_domains!r} must be among --domains {a.domains!r}")
    sizes = sorted(int(s) for s in a.sizes.split(","))
    keeps = [float(k) for k in a.keeps.split(",")]
    methods = [METHODS[int(i)] for i in a.methods.split(",")]

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = Embedder(AutoModel.from_pretrained(path)).eval()
    pools, held, refs, tunes = {}, {}, {}, {}
    for d in domains:
        t0 = time.perf_counter()
        pools[d], h = split_domain(d, a.eval, max(sizes) + a.tune)
        if a.tune:
            pools[d], tunes[d] = pools[d][:-a.tune], batches(tok, pools[d][-a.tune:], a.batch_size)
            refs["tune " + d] = embed(dense, tunes[d])
        held[d] = batches(tok, h, a.batch_size)
        refs[d] = embed(dense, held[d])
        print(f"domain {d}: {len(pools[d]) + len(h)} sentences, {len(h)} held out ({tokens(held[d])} tokens), "
              f"pool {len(pools[d])} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def cosine(model: nn.Module, d: str) -> float:
        return float(F.cosine_similarity(embed(model, held[d]), refs[d], dim=-1).mean())

    def tune_cosine(model: nn.Module, d: str) -> str:
        if d not in tunes:
            return ""
        return f" tune {float(F.cosine_similarity(embed(model, tunes[d]), refs['tune ' + d], dim=-1).mean()):.4f}"

    own: dict[tuple, list[float]] = {}  # (label, domain, N, keep) -> per draw
    cross: dict[tuple, list[float]] = {}  # (label, calib domain, eval domain, keep) -> per draw
    ntok: dict[tuple, list[int]] = {}  # (domain, N) -> per draw
    t_start = time.perf_counter()
    for d in calib_domains:
        for n in sizes:
            for draw in range(a.first_draw, a.first_draw + a.draws):
                pool = list(pools[d])
                random.Random(draw).shuffle(pool)
                calib = batches(tok, pool[:n], a.batch_size)
                ntok.setdefault((d, n), []).append(tokens(calib))
                example = {k: v[:2] for k, v in calib[0].items()}
                for label, crit, comp, scope, steps, augment, *extra in methods:
                    for k in keeps:
                        t0, c0 = time.perf_counter(), time.process_time()
                        model = copy.deepcopy(dense)
                        kw = dict(extra[0]) if extra else {}
                        refit, rec_steps = kw.pop("refit", None), kw.pop("then_reconstruct", 0)
                        report = prune(model, example, crit, ratio=1 - k, preset="mlp-only", scope=scope,
                                       calib_data=calib, compensate=comp, calib_batches=len(calib),
                                       reconstruct_steps=steps, reconstruct_augment=augment, **kw)
                        if refit is not None:
                            refit_consumers(model, dense, calib, consumers_of(model, report.groups),
                                            max_batches=len(calib), ridge=a.refit_ridge, weight=a.refit_weight)
                        if rec_steps:
                            reconstruct(model, dense, calib, blocks_of(model, report.groups), steps=rec_steps,
                                        max_batches=len(calib))
                        # pruning (and refit) only, not the scoring; CPU seconds of this process (the wall time
                        # depends on what else shares the cores)
                        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
                        evals = domains if n == sizes[-1] else [d]
                        for e in evals:
                            v = cosine(model, e)
                            if n == sizes[-1]:
                                cross.setdefault((label, d, e, k), []).append(v)
                            if e == d:
                                own.setdefault((label, d, n, k), []).append(v)
                        others = "".join(f" {e} {cross[(label, d, e, k)][-1]:.4f}" for e in evals if e != d)
                        print(f"  {d:<10} N={n:<5} draw {draw} tokens {ntok[(d, n)][-1]:>6} {label:<40} keep {k}: "
                              f"{own[(label, d, n, k)][-1]:.4f}{tune_cosine(model, d)} ({secs:.0f} s, {cpu:.0f} CPU-s)"
                              + (f" | eval on{others}" if others else ""), flush=True)

    def cell(vals: list[float]) -> str:
        if len(vals) == 1:
            return f"{vals[0]:.4f}"
        return f"{sum(vals) / len(vals):.4f} ({min(vals):.3f}-{max(vals):.3f})"

    print(f"\nMiniLM-L6 FFN pruning (mlp-only, scope as named), no fine-tuning. Mean cosine to the dense embedding on "
          f"{a.eval} held-out sentences of the calibration domain; mean (min-max) over {a.draws} calibration draws. "
          f"Total {time.perf_counter() - t_start:.0f} s.\n")
    print("| domain | N sentences | tokens (per draw) | method | " + " | ".join(f"keep {k}" for k in keeps) + " |")
    print("|---|---|---|---|" + "---|" * len(keeps))
    for d in calib_domains:
        for n in sizes:
            for label, *_ in methods:
                print(f"| {d} | {n} | {'/'.join(str(t) for t in ntok[(d, n)])} | {label} | "
                      + " | ".join(cell(own[(label, d, n, k)]) for k in keeps) + " |")
    for k in keeps:
        print(f"\nCross-domain, keep {k}, N = {sizes[-1]}: calibrate on the row's domain, evaluate on the column's "
              "(mean over draws)\n")
        print("| method | calibrated on | " + " | ".join(f"eval {e}" for e in domains) + " |")
        print("|---|---|" + "---|" * len(domains))
        for label, *_ in methods:
            for d in calib_domains:
                print(f"| {label} | {d} | " + " | ".join(
                    f"{sum(v) / len(v):.4f}" for v in (cross[(label, d, e, k)] for e in domains)) + " |")


if __name__ == "__main__":
    main()
