"""Calibration-batch perturbations for block reconstruction (``reconstruct(..., augment=, augment_copies=)``).

A few hundred sentences are easy to over-fit: ``token_noise`` swaps tokens of a batch for other tokens of the same
batch, so the fit sees more of the input space around the user's text without any other data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prunekit.batch import split_batch
from prunekit.errors import ConfigError


def check_token_batch(batch: Any, field: str, value: Any, key: str = "input_ids", flag: str = "") -> None:
    """``ConfigError`` naming ``field=value`` (and the CLI ``flag``) unless ``batch`` (its inputs) is a dict holding a
    ``key`` tensor."""
    x = split_batch(batch)[0] if batch is not None else None
    if not isinstance(x, dict) or not isinstance(x.get(key), torch.Tensor):
        raise ConfigError(f"{field}={value} perturbs token batches (dicts with {key!r}, as a tokenizer returns them); "
                          f"the calibration batches are {type(x).__name__}: set {field}=0"
                          + (f" ({flag} 0)" if flag else ""))


def token_noise(p: float = 0.3, key: str = "input_ids", mask_key: str = "attention_mask"
                ) -> Callable[[Any, torch.Generator], Any]:
    """An ``augment`` for token batches (dicts with ``input_ids`` and ``attention_mask``, as tokenizers return
    them): each real token except the first and the last of its row (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``;
    left or right padding) is replaced, with probability ``p``, by a token drawn from the batch's own real tokens
    (the calibration text's unigram distribution, so no vocabulary is needed and the text stays in its domain; a
    token may be drawn in its own place, so slightly fewer than ``p`` change). The noise is drawn on the CPU
    generator and moved to the batch's device: the same on CPU and GPU."""
    if not 0.0 < p < 1.0:
        raise ConfigError(f"token_noise(p={p}) must be in (0, 1)")

    def apply(batch: Any, gen: torch.Generator) -> Any:
        check_token_batch(batch, "token_noise: augment_copies", "N", key)
        ids = batch[key]
        mask = batch.get(mask_key)
        real = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
        rows = torch.arange(ids.shape[0], device=ids.device)
        inner = real.clone()
        inner[rows, real.long().argmax(1)] = False  # each row's first real token
        inner[rows, real.long().cumsum(1).argmax(1)] = False  # and its last
        pool = ids[inner]
        if pool.numel() == 0:
            return dict(batch)
        hit = inner & (torch.rand(ids.shape, generator=gen) < p).to(ids.device)
        new = ids.clone()
        new[hit] = pool[torch.randint(pool.numel(), (int(hit.sum()),), generator=gen).to(ids.device)]
        return {**batch, key: new}

    return apply
