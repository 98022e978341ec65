"""Training and evaluation: flat loops, per-batch cosine schedule, resumable atomic checkpoints."""

from prunekit.train.loop import evaluate, finish_run, fit, is_main_process, split_batch, to_device, train_one_epoch
from prunekit.train.settings import TrainSettings, check_device

__all__ = ["TrainSettings", "check_device", "evaluate", "finish_run", "fit", "is_main_process", "split_batch",
           "to_device", "train_one_epoch"]
