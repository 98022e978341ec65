"""Sequential decoder width pruning: carried hidden states against a partial forward pass per layer.

Both give the same pruned model (checked here: the largest logit difference is printed); the carried pass runs
each decoder layer a fixed number of times, the partial passes run layers ``0..l-1`` again for every layer ``l``.
A random Llama of ``--layers`` layers (``--hidden``) is pruned with the given settings twice, alternately, in one
process; wall seconds of each and their ratio are printed.

    OMP_NUM_THREADS=1 python benchmarks/llm_carry.py --layers 16 --reconstruct-steps 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

from prunekit.pruning.llm import prune_width
from prunekit.pruning.llm import width as width_mod


def build(layers: int, hidden: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                   num_key_value_heads=hidden // 64, max_position_embeddings=512)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def run(dense: torch.nn.Module, ids: torch.Tensor, carried: bool, opts: dict) -> tuple[float, torch.nn.Module]:
    model = copy.deepcopy(dense)
    real = width_mod.affordable
    width_mod.affordable = real if carried else (lambda *a, **k: False)
    try:
        t0 = time.perf_counter()
        rep = prune_width(model, ids, **opts)
        seconds = time.perf_counter() - t0
    finally:
        width_mod.affordable = real
    assert rep["calibration_pass"] == ("carried" if carried else "partial forwards (memory)")
    return seconds, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--mlp-ratio", type=float, default=0.5)
    p.add_argument("--head-ratio", type=float, default=0.5)
    p.add_argument("--reconstruct-steps", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    vocab = 512
    dense = build(args.layers, args.hidden, vocab)
    ids = torch.randint(0, vocab, (args.sequences, args.tokens), generator=torch.Generator().manual_seed(1))
    opts = dict(mlp_ratio=args.mlp_ratio, head_ratio=args.head_ratio, reconstruct_steps=args.reconstruct_steps)
    times: dict[bool, list[float]] = {True: [], False: []}
    models: dict[bool, torch.nn.Module] = {}
    for _ in range(args.repeats):
        for carried in (False, True):
            s, models[carried] = run(dense, ids, carried, opts)
            times[carried].append(s)
    x = ids[:2]
    with torch.no_grad():
        diff = float((models[True](input_ids=x).logits - models[False](input_ids=x).logits).abs().max())
    part, carr = statistics.median(times[False]), statistics.median(times[True])
    print(f"Llama {args.layers} layers, hidden {args.hidden}, {args.sequences} x {args.tokens} calibration tokens, "
          f"{opts}, torch threads {torch.get_num_threads()}")
    print(f"| pass | seconds (median of {args.repeats}) | all runs |")
    print("|---|---|---|")
    print(f"| partial forward per layer | {part:.1f} | {', '.join(f'{t:.1f}' for t in times[False])} |")
    print(f"| carried hidden states | {carr:.1f} | {', '.join(f'{t:.1f}' for t in times[True])} |")
    print(f"speed-up {part / carr:.2f}x; largest logit difference between the two pruned models {diff:.2e}")


if __name__ == "__main__":
    main()
