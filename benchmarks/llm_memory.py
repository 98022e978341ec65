"""Peak memory of LLM pruning one decoder layer at a time: width, SparseGPT, depth (``prunekit.pruning.llm.stream*``).

A Llama-3.2-1B-shaped model (hidden 2048, MLP 8192, 16 layers, 32 heads / 8 key-value heads, vocabulary 128256,
tied embeddings) with random bf16 weights is written shard by shard from its config (never whole in memory), then
pruned in a child process per run (``--runs``): width by ``prune_width_streaming``, ``sparsegpt`` (50%, or ``--nm``)
by ``sparsify_streaming``, ``depth`` (``--drop-layers``, angular) by ``prune_depth_streaming``, each child's peak RSS
(VmHWM) reported next to the model's bf16 bytes, one layer's bytes and the kept activations. A child that only
imports torch, transformers and prunekit gives the runtime's own floor. The width figure is also computed on paper
for a Llama-3.1-8B shape.

    python benchmarks/llm_memory.py                          # MLP 50%, wanda, no compensation, 2 x 64 tokens
    python benchmarks/llm_memory.py --compensate lstsq --ridge 0.01 --mlp-ratio 0.5
    python benchmarks/llm_memory.py --full                   # also the in-memory path (loads the whole model)
    python benchmarks/llm_memory.py --runs sparsegpt,depth   # only those streaming runs

Everything runs on CPU threads=1 (``--threads``); the folder is cached in ``--dir``.

Measured on a shared 2-core machine (load ~7), bf16, 2 x 64 calibration tokens, peak RSS (GiB, x the model's bf16):

    python benchmarks/llm_memory.py --runs width,depth            # Llama-3.2-1B shape, 16 layers (2.30 GiB)
      width (MLP 50%, wanda)  1.76 GiB (0.76 x)   36 s
      depth (4 layers, angular) 0.92 GiB (0.40 x)  12 s       runtime floor 0.60 GiB
    python benchmarks/llm_memory.py --runs sparsegpt --layers 4   # the same layers, 4 of them (16 take ~30 min here)
      sparsegpt 50%           2.19 GiB (0.95 x the 16-layer model) 427 s

SparseGPT's peak is one layer's workspace, not the model's: down_proj's Hessian (8192 x 8192 float32, 0.25 GiB) in
about four copies while its inverse Cholesky factor is formed, plus the layer's other Hessians; on an 8B shape
(14336-wide MLP) that is ~3.1 GiB of a 15 GiB model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("width", "sparsegpt", "depth")
SHAPES = {  # name: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
}


def config_of(shape: str):
    from transformers import LlamaConfig

    h, i, n, q, kv, v, tied = SHAPES[shape]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=q,
                       num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tied, max_position_embeddings=4096,
                       architectures=["LlamaForCausalLM"], dtype="bfloat16")


def counts(shape: str) -> dict[str, int]:
    """Parameter counts: one decoder layer, the embedding, the LM head (0 when tied), the total."""
    h, i, n, q, kv, v, tied = SHAPES[shape]
    hd = h // q
    layer = h * q * hd * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h
    emb = v * h
    head = 0 if tied else v * h
    return {"layer": layer, "embedding": emb, "head": head, "total": n * layer + emb + head + h}


def make_folder(path: Path, shape: str) -> None:
    """Random bf16 weights written one decoder layer per shard (one layer in memory at a time)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    config = config_of(shape)
    with torch.device("meta"):
        shapes = {k: tuple(t.shape) for k, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        groups.setdefault(".".join(k.split(".")[:3]) if k.startswith("model.layers.") else k, []).append(k)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for j, (_, names) in enumerate(groups.items()):
        file = f"model-{j:05d}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else
                       torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)


def child(args: argparse.Namespace) -> None:
    """Runs in its own process: prints JSON with its peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {}
    if args.child != "idle":
        from prunekit.pruning.llm import prune_width
        from prunekit.pruning.llm.stream import prune_width_streaming
        from prunekit.pruning.llm.stream_depth import prune_depth_streaming
        from prunekit.pruning.llm.stream_sparse import sparsify_streaming

        ids = torch.randint(0, 128256, (args.calib, args.seq_len), generator=torch.Generator().manual_seed(1))
        opts = {"mlp_ratio": args.mlp_ratio, "criterion": args.criterion, "compensate": args.compensate,
                "ridge": args.ridge}
        t0 = time.perf_counter()
        out_dir, bf16 = f"{args.out}-{args.child}", {"dtype": torch.bfloat16}
        if args.child == "full":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16).eval()
            prune_width(model, ids, **opts)
        else:
            if args.child == "width":
                rep = prune_width_streaming(args.dir, out_dir, ids, **bf16, **opts)
            elif args.child == "sparsegpt":
                nm = tuple(map(int, args.nm.split(":"))) if args.nm else None
                rep = sparsify_streaming(args.dir, out_dir, ids, "sparsegpt", sparsity=None if nm else 0.5, nm=nm,
                                         **bf16)
            else:
                rep = prune_depth_streaming(args.dir, out_dir, ids, drop_layers=args.drop_layers, **bf16)
            out["max_resident_layers"] = rep["max_resident_layers"]
        out["seconds"] = round(time.perf_counter() - t0, 1)
    import transformers  # noqa: F401

    import prunekit  # noqa: F401  (the floor includes the package)

    out["peak_rss"] = peak_rss()
    print(json.dumps(out))


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits
    from its parent's high-water mark on Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(kind: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--dir", str(args.dir), "--out", str(args.out),
            "--nm", args.nm, "--drop-layers", str(args.drop_layers),
            "--threads", str(args.threads), "--calib", str(args.calib), "--seq-len", str(args.seq_len),
            "--mlp-ratio", str(args.mlp_ratio), "--criterion", args.criterion, "--compensate", args.compensate,
            "--ridge", str(args.ridge)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def on_paper(shape: str, tokens: int, compensate: str, floor: float) -> dict[str, float]:
    """Bytes the streaming path holds at its peak, from the shape (bf16 weights and activations)."""
    h, i, *_ = SHAPES[shape]
    c = counts(shape)
    layer = 2 * c["layer"] * 2  # a layer and its pruned copy while slicing
    acts = 2 * tokens * h * 2  # a layer's inputs and outputs
    stats = 3 * i * i * 8 if compensate == "lstsq" else 4 * i * 8  # down_proj input moments (float64; halves)
    emb = c["embedding"] * 2  # step 2 only, never with a layer
    return {"model_bf16": c["total"] * 2, "peak": floor + max(emb + acts, layer + acts + stats), "layer": layer / 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="model folder (default /tmp/prunekit_llm_memory/SHAPE)")
    p.add_argument("--out", type=Path, default=Path("/tmp/prunekit_llm_memory/pruned"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--mlp-ratio", type=float, default=0.5)
    p.add_argument("--criterion", default="wanda")
    p.add_argument("--compensate", default="none")
    p.add_argument("--ridge", default="auto")
    p.add_argument("--full", action="store_true", help="also measure the in-memory width path (whole model loaded)")
    p.add_argument("--runs", default="width,sparsegpt,depth", help="streaming runs measured: width, sparsegpt, depth")
    p.add_argument("--nm", default="", help="sparsegpt: an N:M pattern (e.g. 2:4) instead of 50%% unstructured")
    p.add_argument("--drop-layers", type=int, default=4, help="depth: decoder layers removed")
    p.add_argument("--layers", type=int, default=16, help="decoder layers of the Llama-3.2-1B shape (fewer: the same "
                   "layers, a shorter run; the peak is one layer's, not the model's)")
    p.add_argument("--child", choices=["idle", *RUNS, "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ridge != "auto":
        args.ridge = float(args.ridge)
    if args.child:
        return child(args)
    shape = "llama-3.2-1b" if args.layers == 16 else f"llama-3.2-1b-{args.layers}l"
    h, i, _, q, kv, v, tied = SHAPES["llama-3.2-1b"]
    SHAPES[shape] = (h, i, args.layers, q, kv, v, tied)
    args.dir = args.dir or Path(f"/tmp/prunekit_llm_memory/{shape}")
    t0 = time.perf_counter()
    make_folder(args.dir, shape)
    print(f"model folder ready in {time.perf_counter() - t0:.0f} s: {args.dir}")
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"--runs {bad[0]!r}: valid runs are {', '.join(RUNS)}")
    idle = run_child("idle", args)["peak_rss"]
    streams = {r: run_child(r, args) for r in runs}
    full = run_child("full", args) if args.full else None
    report(args, shape, idle, streams, full)


def report(args: argparse.Namespace, shape: str, idle: int, streams: dict[str, dict], full: dict | None) -> None:
    """The table: model and layer bytes, the runtime floor, each run's peak RSS; the bound; the on-paper figures."""
    tokens, gib = args.calib * args.seq_len, 2 ** 30
    c = counts(shape)
    model = c["total"] * 2
    acts = 2 * tokens * SHAPES[shape][0] * 2
    what = {"width": f"width: MLP {args.mlp_ratio:.0%}, {args.criterion}, compensate {args.compensate}",
            "sparsegpt": f"sparsegpt {args.nm or '50%'}", "depth": f"depth: {args.drop_layers} layers dropped"}
    print(f"\n{shape}, {tokens} calibration tokens, bf16, {args.threads} thread(s); "
          f"{'; '.join(what[r] for r in streams)}\n")
    print("| | GiB | x model bf16 |\n|---|---|---|")
    rows = [(f"model bytes, bf16 ({c['total'] / 1e9:.2f} B params)", model),
            ("one decoder layer, bf16", c["layer"] * 2),
            ("runtime floor (python + torch + transformers + prunekit)", idle)]
    rows += [(f"{r} streaming peak RSS ({s['seconds']} s, {s['max_resident_layers']} layer resident)", s["peak_rss"])
             for r, s in streams.items()]
    if full:
        rows.append((f"in-memory peak RSS (from_pretrained + prune_width, {full['seconds']} s)", full["peak_rss"]))
    for name, b in rows:
        print(f"| {name} | {b / gib:.2f} | {b / model:.2f} |")
    whole = counts("llama-3.2-1b")["total"] * 2
    if shape != "llama-3.2-1b":  # the peak is one layer's: compare it with the whole 16-layer model too
        print("\n" + "; ".join(f"{r}: {s['peak_rss'] / whole:.2f} x the 16-layer Llama-3.2-1B's bf16 bytes "
                                f"({whole / gib:.2f} GiB)" for r, s in streams.items()))
    bound = 1.3 * model + acts
    for r, s in streams.items():
        print(f"{r}: bound 1.3 x model bf16 + activations = {bound / gib:.2f} GiB: "
              f"{'met' if s['peak_rss'] <= bound else 'NOT met'}")
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        e = on_paper(name, tokens, args.compensate, idle)
        print(f"on paper (width), {name}: model {e['model_bf16'] / gib:.2f} GiB bf16, streaming peak "
              f"~{e['peak'] / gib:.2f} GiB ({e['peak'] / e['model_bf16']:.2f} x), one layer {e['layer'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
