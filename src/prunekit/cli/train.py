"""``prunekit train``, ``prunekit finetune`` and ``prunekit eval``."""

from __future__ import annotations

import json
import sys

from prunekit.cli.args import command
from prunekit.pipeline.stages import EvalConfig, FinetuneConfig, TrainConfig, evaluate_run, finetune, train


@command("train", TrainConfig, help="Train a model on a dataset and write a run directory")
def train_cmd(cfg: TrainConfig) -> None:
    from prunekit.data.core import data_settings
    from prunekit.models.external import check_image_size, coerce_kwargs

    # a ViT built for 224 px fed 16 px digits: one line naming --image-size / --model-kwargs, before any work
    check_image_size(cfg.model, data_settings(cfg)["image_size"], coerce_kwargs(cfg.model_kwargs))
    m = train(cfg)
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%  MACs {m['macs'] / 1e6:.2f} M  params {m['params'] / 1e3:.1f} K")


@command("finetune", FinetuneConfig, help="Fine-tune the model of a run directory (after pruning)")
def finetune_cmd(cfg: FinetuneConfig) -> None:
    m = finetune(cfg)
    print(f"wrote {cfg.out}: top1 {m['top1']:.2f}%  MACs {m['macs'] / 1e6:.2f} M  params {m['params'] / 1e3:.1f} K")


@command("eval", EvalConfig, help="Evaluate the model of a run directory (top-1/top-5, loss, MACs, params)")
def eval_cmd(cfg: EvalConfig) -> None:
    m = evaluate_run(cfg)
    json.dump(m, sys.stdout, indent=2)
    print()
