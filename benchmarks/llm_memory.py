"""Peak memory of LLM width pruning one decoder layer at a time (``prunekit.pruning.llm.stream``).

A Llama-3.2-1B-shaped model (hidden 2048, MLP 8192, 16 layers, 32 heads / 8 key-value heads, vocabulary 128256,
tied embeddings) with random bf16 weights is written shard by shard from its config (never whole in memory), then
width-pruned by ``prune_width_streaming`` in a child process whose peak RSS (``ru_maxrss``) is reported next to the
model's bf16 bytes, one layer's bytes and the kept activations. A second child that only imports torch, transformers
and prunekit gives the runtime's own floor. The same figure is computed on paper for a Llama-3.1-8B shape.

    python benchmarks/llm_memory.py                          # MLP 50%, wanda, no compensation, 2 x 64 tokens
    python benchmarks/llm_memory.py --compensate lstsq --ridge 0.01 --mlp-ratio 0.5
    python benchmarks/llm_memory.py --full                   # also the in-memory path (loads the whole model)

Everything runs on CPU threads=1 (``--threads``); the folder is cached in ``--dir``.
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

        ids = torch.randint(0, 128256, (args.calib, args.seq_len), generator=torch.Generator().manual_seed(1))
        opts = {"mlp_ratio": args.mlp_ratio, "criterion": args.criterion, "compensate": args.compensate,
                "ridge": args.ridge}
        t0 = time.perf_counter()
        if args.child == "stream":
            rep = prune_width_streaming(args.dir, args.out, ids, dtype=torch.bfloat16, **opts)
            out["max_resident_layers"] = rep["max_resident_layers"]
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16).eval()
            prune_width(model, ids, **opts)
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
    p.add_argument("--dir", type=Path, default=Path("/tmp/prunekit_llm_memory/llama-3.2-1b"))
    p.add_argument("--out", type=Path, default=Path("/tmp/prunekit_llm_memory/pruned"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--mlp-ratio", type=float, default=0.5)
    p.add_argument("--criterion", default="wanda")
    p.add_argument("--compensate", default="none")
    p.add_argument("--ridge", default="auto")
    p.add_argument("--full", action="store_true", help="also measure the in-memory path (whole model loaded)")
    p.add_argument("--child", choices=["idle", "stream", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ridge != "auto":
        args.ridge = float(args.ridge)
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    make_folder(args.dir, "llama-3.2-1b")
    print(f"model folder ready in {time.perf_counter() - t0:.0f} s: {args.dir}")
    idle = run_child("idle", args)["peak_rss"]
    stream = run_child("stream", args)
    full = run_child("full", args) if args.full else None
    tokens = args.calib * args.seq_len
    gib = 2 ** 30
    c = counts("llama-3.2-1b")
    model = c["total"] * 2
    acts = 2 * tokens * SHAPES["llama-3.2-1b"][0] * 2
    print(f"\nwidth pruning, MLP {args.mlp_ratio:.0%}, {args.criterion}, compensate {args.compensate}, "
          f"{tokens} calibration tokens, {args.threads} thread(s)\n")
    print("| | GiB | x model bf16 |\n|---|---|---|")
    rows = [("model bytes, bf16 (1.24 B params)", model), ("one decoder layer, bf16", c["layer"] * 2),
            ("runtime floor (python + torch + transformers + prunekit)", idle),
            (f"streaming peak RSS ({stream['seconds']} s, {stream['max_resident_layers']} layer resident)",
             stream["peak_rss"])]
    if full:
        rows.append((f"in-memory peak RSS (from_pretrained + prune_width, {full['seconds']} s)", full["peak_rss"]))
    for name, b in rows:
        print(f"| {name} | {b / gib:.2f} | {b / model:.2f} |")
    bound = 1.3 * model + acts
    print(f"\nbound 1.3 x model bf16 + activations = {bound / gib:.2f} GiB: "
          f"{'met' if stream['peak_rss'] <= bound else 'NOT met'}")
    for shape in SHAPES:
        e = on_paper(shape, tokens, args.compensate, idle)
        print(f"on paper, {shape}: model {e['model_bf16'] / gib:.2f} GiB bf16, streaming peak ~{e['peak'] / gib:.2f} "
              f"GiB ({e['peak'] / e['model_bf16']:.2f} x), one layer {e['layer'] / gib:.2f} GiB")


if __name__ == "__main__":
    main()
