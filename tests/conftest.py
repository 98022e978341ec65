"""Shared fixtures: fixed seeds, offline Hugging Face, no progress bars, a trained tiny run dir."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PRUNEKIT_NO_BAR", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A smallcnn trained for 2 epochs on digits (about 2 s): the source of prune/finetune/eval tests."""
    from prunekit.pipeline.stages import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "base"
    cfg = TrainConfig.build({"model": "smallcnn", "dataset": "digits", "epochs": 2, "lr": 0.05, "out": str(out)})
    train(cfg)
    return out
