"""Three text domains every machine has, tokenizers, and three small decoders of different families (cached).

Domains (each split by a hash of the source's own name, so a source is in exactly one split; ``test`` sources are
never used for training, calibration or any choice of defaults):

- ``code``: the ``.py`` files of Python's standard library (``llm_common.corpus_files``: md5 % 10 == 0 -> test,
  1 -> val, else train);
- ``man``: English manual pages (``/usr/share/man/man[1-8]``, gzip), roff markup stripped to text; a seeded sample
  of at most ``MAN_PAGES`` pages;
- ``reference``: the Python language reference's prose (``pydoc_data.topics``: one source per topic).

Tokenizers: bytes (vocab 256) or a byte-level BPE (vocab 2048) trained offline with ``tokenizers`` on the three
train splits (cached as ``tokenizer.json``).

Models (:data:`MODELS`), each trained once from scratch on an equal mixture of the three train splits and cached
(``save_pretrained``) under ``~/.cache/prunekit/llm_grid/<name>``:

- ``llama-byte``: Llama, multi-head attention (4 query = 4 key-value heads), bytes;
- ``qwen2-bpe``: Qwen2 (q/k/v biases), GQA 8 query / 2 key-value heads, BPE;
- ``mistral-byte``: Mistral, GQA 6 query / 3 key-value heads, sliding-window attention, bytes.

    OMP_NUM_THREADS=2 python benchmarks/llm_corpora.py      # trains (or loads) every model, prints perplexities
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_common as lc  # noqa: E402

log = logging.getLogger("llm_corpora")

CACHE = Path(os.environ.get("PRUNEKIT_LLM_CACHE", Path.home() / ".cache" / "prunekit")) / "llm_grid"
DOMAINS = ("code", "man", "reference")
MAN_PAGES = 2500
MAX_TRAIN_BYTES = 6_000_000  # per domain (the stdlib alone has ~30 MB)
MAX_EVAL_BYTES = 400_000


def _split_of(name: str, test: int = 1) -> str:
    """``test`` tenths of the sources go to test, one tenth to val, the rest to train."""
    h = int(hashlib.md5(name.encode()).hexdigest(), 16) % 10
    return "test" if h < test else "val" if h == test else "train"


_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[-+]?\d|\\[{}]")
_ROFF_ESC = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(em": "--", r"\(en": "-", r"\(bu": "*", r"\e": "\\",
             r"\&": "", r"\(co": "(c)", r"\ ": " ", r"\|": "", r"\^": "", r"\(lq": '"', r"\(rq": '"'}


def roff_to_text(src: str) -> str:
    """A man page's roff source as plain text (macros dropped, headings and paragraphs kept)."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'")) or line.startswith(".\\}"):
            continue
        if line.startswith("."):
            parts = line[1:].split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "IP", "TP", "TH", "Nm", "Nd", "Fl", "Ar"):
                if rest and macro != "TH":
                    out.append(rest.replace('"', ""))
            elif macro in ("PP", "LP", "P", "br", "sp", "Pp"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    text = _ROFF_FONT.sub("", text)
    for k, v in _ROFF_ESC.items():
        text = text.replace(k, v)
    return re.sub(r"\n{3,}", "\n\n", text)


def _sources(domain: str) -> list[tuple[str, bytes]]:
    """(name, text bytes) of every source of a domain, in a fixed order."""
    if domain == "code":  # names carry their split (llm_common's split of the stdlib files)
        return [(f"{split}:{p.as_posix()}", p.read_bytes()) for split, files in lc.corpus_files().items()
                for p in files]
    if domain == "man":
        pages = sorted(p for d in sorted(Path("/usr/share/man").glob("man[1-8]")) for p in d.glob("*.gz"))
        pages = sorted(pages, key=lambda p: hashlib.md5(p.name.encode()).hexdigest())[:MAN_PAGES]
        out = []
        for p in sorted(pages):
            try:
                out.append((p.name, roff_to_text(gzip.decompress(p.read_bytes()).decode("utf-8", "replace"))
                            .encode()))
            except (OSError, EOFError):
                continue
        return out
    if domain == "reference":
        from pydoc_data.topics import topics

        return [(k, topics[k].encode()) for k in sorted(topics)]
    raise ValueError(f"domain {domain!r}: valid: {', '.join(DOMAINS)}")


def domain_text(domain: str) -> dict[str, bytes]:
    """``{"train", "val", "test"}`` -> bytes of a domain (sources joined by a blank line; capped)."""
    cache = CACHE / "text" / f"{domain}.json"
    if cache.exists():
        return {k: bytes.fromhex(v) for k, v in json.loads(cache.read_text()).items()}
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for name, blob in _sources(domain):
        # the language reference has only 79 topics: a fifth of them is test
        split = name.split(":", 1)[0] if domain == "code" else _split_of(name, 2 if domain == "reference" else 1)
        parts[split].append(blob)
    caps = {"train": MAX_TRAIN_BYTES, "val": MAX_EVAL_BYTES, "test": MAX_EVAL_BYTES}
    out = {k: lc.SEPARATOR.join(v)[:caps[k]] for k, v in parts.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: v.hex() for k, v in out.items()}))
    return out


# ------------------------------------------------------------------------------------------------------ tokenizers
def bpe_tokenizer(vocab: int = 2048):
    """A byte-level BPE trained on the three train splits (cached ``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = CACHE / f"bpe{vocab}" / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (domain_text(d)["train"][i:i + 100_000].decode("utf-8", "replace")
             for d in DOMAINS for i in range(0, 2_000_000, 100_000))
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def encode(text: bytes, tokenizer: str) -> torch.Tensor:
    if tokenizer == "byte":
        return lc.ByteTokenizer().encode(text)
    ids = bpe_tokenizer(int(tokenizer[3:])).encode(text.decode("utf-8", "replace")).ids
    return torch.tensor(ids, dtype=torch.long)


def domain_tokens(domain: str, tokenizer: str) -> dict[str, torch.Tensor]:
    cache = CACHE / "tokens" / f"{domain}_{tokenizer}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    out = {k: encode(v, tokenizer) for k, v in domain_text(domain).items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


# ---------------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class GridModel:
    name: str
    family: str  # llama | qwen2 | mistral
    tokenizer: str  # byte | bpe2048
    hidden: int = 192
    layers: int = 4
    intermediate: int = 512
    heads: int = 4
    kv_heads: int = 4
    seq_len: int = 128
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3

    @property
    def vocab(self) -> int:
        return 256 if self.tokenizer == "byte" else int(self.tokenizer[3:])

    def config(self):
        import transformers

        common = dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.kv_heads, max_position_embeddings=self.seq_len * 2,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
        if self.family == "llama":
            return transformers.LlamaConfig(**common)
        if self.family == "qwen2":
            return transformers.Qwen2Config(**common, use_sliding_window=False)
        return transformers.MistralConfig(**common, sliding_window=self.seq_len // 2)


MODELS = {m.name: m for m in (
    GridModel("llama-byte", "llama", "byte", heads=4, kv_heads=4),
    GridModel("qwen2-bpe", "qwen2", "bpe2048", heads=8, kv_heads=2),
    GridModel("mistral-byte", "mistral", "byte", heads=6, kv_heads=3),
)}


def train(spec: GridModel, seed: int = 0):
    """Train ``spec`` from scratch on an equal mixture of the domains' train splits; returns (model, log)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(spec.config())
    data = [domain_tokens(d, spec.tokenizer)["train"] for d in DOMAINS]
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    warm = spec.steps // 12
    model.train()
    t0, losses = time.time(), []
    per = spec.batch_size // len(DOMAINS) + 1
    for step in range(spec.steps):
        t = max(0.0, (step - warm) / max(1, spec.steps - warm))
        lr = spec.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.cat([lc.random_windows(d, per, spec.seq_len + 1, gen) for d in data])[:spec.batch_size]
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, spec.steps // 10) == 0 or step == spec.steps - 1:
            log.info("%s step %d/%d loss %.3f (%.0f s)", spec.name, step, spec.steps,
                     sum(losses[-20:]) / len(losses[-20:]), time.time() - t0)
    model.eval()
    return model, {"seconds": time.time() - t0, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def get_model(name: str, seed: int = 0):
    """The cached trained model ``name`` (trained on first use), eval mode, float32."""
    from transformers import AutoModelForCausalLM

    spec = MODELS[name]
    path = CACHE / f"{name}_s{spec.steps}_seed{seed}"
    if not (path / "model.safetensors").exists():
        model, info = train(spec, seed)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(info | {"spec": dataclasses.asdict(spec)}, indent=1))
        if path.exists():
            import shutil

            shutil.rmtree(path)
        tmp.rename(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for d in DOMAINS:
        t = domain_text(d)
        print(d, {k: f"{len(v) / 1e6:.2f} MB" for k, v in t.items()})
    for name, spec in MODELS.items():
        model = get_model(name)
        n = sum(p.numel() for p in model.parameters())
        ppl = {d: lc.perplexity(model, domain_tokens(d, spec.tokenizer)["test"], seq_len=spec.seq_len,
                                max_tokens=60_000) for d in DOMAINS}
        print(f"{name}: {n / 1e6:.2f} M params; test ppl " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
