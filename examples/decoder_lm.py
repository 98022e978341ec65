"""A decoder LM: MLP width and GQA groups, whole layers (depth), Wanda and SparseGPT; perplexity before and after;
the pruned model reloaded in plain ``transformers``.

A small Llama is built from a config and trained for a few hundred steps on Python's standard-library sources, read
as bytes (vocabulary 256, no tokenizer to download). Use your own with ``AutoModelForCausalLM.from_pretrained(...)``
and your tokenizer's ids: every call below is the same. ``PRUNEKIT_EXAMPLE_TINY=1``: a smaller model, fewer steps.
"""

import copy
import os
import sysconfig
import tempfile
from pathlib import Path

import torch

import prunekit
from prunekit.measure.perplexity import perplexity
from prunekit.pruning.llm import save_pruned
from prunekit.pruning.llm.depth import DepthConfig

try:
    from transformers import AutoModelForCausalLM, LlamaConfig
except ImportError:
    raise SystemExit("this example needs the hf extra: pip install -e '.[hf]'") from None

TINY = os.environ.get("PRUNEKIT_EXAMPLE_TINY") == "1"
HIDDEN, STEPS, SEQ = (64, 40, 64) if TINY else (128, 400, 128)
torch.manual_seed(0)
torch.set_num_threads(1)

# text: the standard library's sources as bytes, split by file into train and test
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8).long() for f in files[:60]]
train_ids, test_ids = torch.cat(data[:50]), torch.cat(data[50:])[:20_000]

config = LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                     tie_word_embeddings=True)
model = AutoModelForCausalLM.from_config(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(0)
for _ in range(STEPS):  # a short language-model training: 16 random windows a step
    starts = torch.randint(0, len(train_ids) - SEQ - 1, (16,), generator=g)
    batch = torch.stack([train_ids[s:s + SEQ] for s in starts.tolist()])  # (B, T)
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()

# calibration data: token ids (B, T) from the training text, never from the test text
calib = torch.stack([train_ids[i * SEQ:(i + 1) * SEQ] for i in range(32)])


def ppl(m: torch.nn.Module) -> float:
    return perplexity(m, test_ids, seq_len=SEQ)


print(f"dense: {prunekit.count_params(model) / 1e6:.2f} M params, test perplexity {ppl(model):.3f}")

# 1. width: half of every MLP's channels and one of the two GQA groups, refitted by least squares (no fine-tuning)
narrow = copy.deepcopy(model)
report = prunekit.prune(narrow, None, prunekit.WidthConfig(mlp_ratio=0.5, head_ratio=0.5), calib_data=calib)
print(f"width 50% MLP + 50% GQA groups: {prunekit.count_params(narrow) / 1e6:.2f} M params, "
      f"perplexity {ppl(narrow):.3f}")

# 2. depth: the decoder layer whose output changes its input least (angular distance) is removed whole
shallow = copy.deepcopy(model)
depth = prunekit.prune(shallow, None, DepthConfig(drop_layers=1), calib_data=calib)
print(f"depth: dropped layer {depth['dropped']} of 3, perplexity {ppl(shallow):.3f}")

# 3. unstructured 50% and 2:4 sparsity, block by block on the calibration ids
for method in ("wanda", "sparsegpt"):
    for options in ({"sparsity": 0.5}, {"nm": "2:4"}):
        sparse = copy.deepcopy(model)
        prunekit.prune(sparse, None, prunekit.SparsityConfig(method=method, **options), calib_data=list(calib.split(8)))
        print(f"{method} {options}: perplexity {ppl(sparse):.3f}")

# 4. save the width-pruned model; plain transformers reloads it (its config carries the new widths)
out = Path(tempfile.mkdtemp(prefix="prunekit-llm-")) / "pruned"
save_pruned(narrow, out, report)
again = AutoModelForCausalLM.from_pretrained(out).eval()
print(f"reloaded from {out}: intermediate_size {again.config.intermediate_size}, "
      f"key-value heads {again.config.num_key_value_heads}, perplexity {ppl(again):.3f}")
torch.testing.assert_close(again(test_ids[None, :SEQ]).logits, narrow(test_ids[None, :SEQ]).logits)
