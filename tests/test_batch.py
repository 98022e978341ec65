"""prunekit.batch: the one split_batch / to_device / call_model, serving calibration (strict) and training (lenient)."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch import nn

from prunekit.batch import batch_size_of, call_model, split_batch, to_device
from prunekit.errors import PruningError

X = torch.arange(6.0).reshape(2, 3)
Y = torch.tensor([0, 1])


@pytest.mark.parametrize("strict", [True, False])
def test_split_batch_shapes_both_modes_agree_on(strict: bool) -> None:
    assert split_batch(X, strict=strict) == (X, None)
    assert split_batch((X,), strict=strict) == (X, None)
    x, y = split_batch([X, Y], strict=strict)
    assert x is X and y is Y
    x, y = split_batch({"input_ids": X, "labels": Y}, strict=strict)
    assert list(x) == ["input_ids"] and y is Y
    x, y = split_batch({"input_ids": X}, strict=strict)
    assert list(x) == ["input_ids"] and y is None


def test_split_batch_reads_any_mapping_and_leaves_it_untouched() -> None:
    batch = UserDict(input_ids=X, labels=Y)  # a Hugging Face BatchEncoding is a UserDict, not a dict
    x, y = split_batch(batch)
    assert isinstance(x, dict) and list(x) == ["input_ids"] and y is Y
    assert "labels" in batch  # the caller's batch keeps its labels


def test_split_batch_strict_refuses_what_it_cannot_read() -> None:
    with pytest.raises(PruningError, match="3 items"):
        split_batch((X, Y, Y))
    with pytest.raises(PruningError, match="of type str"):
        split_batch("not a batch")
    with pytest.raises(PruningError, match="0 items"):
        split_batch((), strict=False)


def test_split_batch_lenient_is_the_training_loops_reading() -> None:
    x, y = split_batch((X, Y, torch.tensor([7, 8])), strict=False)  # (x, y, index) datasets
    assert x is X and y is Y
    obj = object()
    assert split_batch(obj, strict=False) == (obj, None)


def test_to_device_nested_and_non_blocking() -> None:
    batch = {"a": X, "b": [X, (Y, "keep")], "c": 3}
    out = to_device(batch, "meta", non_blocking=True)
    assert out["a"].device.type == "meta" and out["b"][0].device.type == "meta"
    assert isinstance(out["b"], list) and isinstance(out["b"][1], tuple)
    assert out["b"][1][0].device.type == "meta" and out["b"][1][1] == "keep" and out["c"] == 3
    assert X.device.type == "cpu"  # the input is not moved in place


class _Two(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return a if b is None else a - b


def test_call_model_and_batch_size() -> None:
    m = _Two()
    torch.testing.assert_close(call_model(m, X), X)
    torch.testing.assert_close(call_model(m, (X, X)), torch.zeros_like(X))
    torch.testing.assert_close(call_model(m, {"a": X, "b": 2 * X}), -X)
    assert batch_size_of(X) == 2 and batch_size_of((X[:1], X)) == 1 and batch_size_of({"a": X}) == 2


def test_old_homes_are_the_same_objects() -> None:
    from prunekit.measure import macs

    assert macs.call_model is call_model and macs.batch_size_of is batch_size_of
