"""Perplexity of a causal language model on a token stream.

The stream is cut into non-overlapping windows of ``seq_len`` tokens (a last partial window is dropped); inside a
window every token but the first is predicted from the ones before it, and the perplexity is
``exp(sum NLL / number of predicted tokens)``. This is the usual "non-overlapping chunks" protocol (GPTQ, Wanda and
SparseGPT report it with ``seq_len`` 2048 on WikiText-2); it scores a little worse than a sliding window because early
tokens of each window have short contexts, and it is comparable only at the same ``seq_len``.

Example:
    >>> ids = torch.tensor(list(open("f.py", "rb").read()))     # a byte-level model
    >>> perplexity(model, ids, seq_len=256)
    4.31
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prunekit.errors import ConfigError


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: Any = model(input_ids=x) if _takes_input_ids(model) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def _takes_input_ids(model: nn.Module) -> bool:
    return hasattr(model, "config") or getattr(model, "input_name", None) == "input_ids"


@torch.no_grad()
def nll_sum(model: nn.Module, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
            max_tokens: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of predicted tokens, over non-overlapping windows."""
    if tokens.ndim != 1:
        raise ConfigError(f"perplexity: tokens must be a 1-D tensor of ids; got shape {tuple(tokens.shape)}")
    if seq_len < 2:
        raise ConfigError(f"perplexity: seq_len must be >= 2; got {seq_len}")
    if batch_size < 1:
        raise ConfigError(f"perplexity: batch_size must be >= 1; got {batch_size}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_win = len(tokens) // seq_len
    if n_win == 0:
        raise ConfigError(f"perplexity: {len(tokens)} tokens are fewer than one window of seq_len={seq_len}; "
                          f"pass more text or a smaller seq_len")
    windows = tokens[: n_win * seq_len].long().view(n_win, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, n_win, batch_size):
            x = windows[i:i + batch_size].to(device)  # (B, T)
            logits = _logits(model, x)[:, :-1].float()  # (B, T-1, V)
            nll = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
               max_tokens: int | None = None) -> float:
    """``exp(mean next-token NLL)`` of ``model`` on ``tokens`` (1-D ids), in windows of ``seq_len``."""
    total, count = nll_sum(model, tokens, seq_len, batch_size, max_tokens)
    return math.exp(total / count)
