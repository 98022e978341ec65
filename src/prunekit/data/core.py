"""Dataset registry, the tensor-backed image dataset, loaders and the ``DataArgs`` config mixin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch.utils.data import DataLoader, Dataset

from prunekit.config import Config
from prunekit.registry import Registry

Split = Literal["train", "calib", "val", "test"]
SPLITS = ("train", "calib", "val", "test")
# train / calib / val are read from the training source; val is carved out of it (seeded, stratified)
TRAIN_SOURCE = ("train", "calib", "val")
VAL_FRACTION = 0.1  # default share of the training data held out as the validation split
VAL_SEED = 0  # default seed of that split (one split for a whole pipeline: it is recorded and inherited)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    description: str = ""  # one line for `prunekit datasets`
    offline: str = ""  # whether it works without a network, and from where
    task: str = "classify"  # "detect": (image, {boxes, labels}) samples and its own val split (none carved)


@dataclass(frozen=True)
class DatasetEntry:
    info: DatasetInfo
    # build(split, data_dir, image_size, download) -> Dataset: the whole training source for train / calib / val
    # (augmented for train only), the held-out source for test
    build: Callable[..., Dataset]


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(info: DatasetInfo):
    """Register ``build(split, data_dir, image_size, download) -> Dataset`` under ``info.name``."""

    def deco(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        DATASETS.register(info.name)(DatasetEntry(info, fn))
        return fn

    return deco


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name).info


def get_dataset(name: str, split: str = "train", data_dir: str | Path | None = None, image_size: int | None = None,
                download: bool = False, limit: int | None = None, seed: int = 0,
                val_fraction: float = VAL_FRACTION, val_seed: int = VAL_SEED) -> Dataset:
    """A dataset split: ``train`` (augmented), ``calib`` (the same images, not augmented), ``val`` (a seeded,
    stratified ``val_fraction`` of the training source, disjoint from train and calib) or ``test`` (the held-out
    set). ``limit`` keeps a fixed random subset of that many samples (seeded by ``seed``).

    Example:
        >>> len(get_dataset("digits", "val")), len(get_dataset("digits", "test"))  # (144, 360)
    """
    from prunekit.errors import ConfigError

    entry = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not valid; choose from {', '.join(SPLITS)}")
    ds = entry.build(split=split, data_dir=Path(data_dir) if data_dir else None,
                     image_size=image_size or entry.info.image_size, download=download)
    if split in TRAIN_SOURCE and entry.info.task == "classify":
        train_idx, val_idx = val_split_indices(dataset_labels(ds), val_fraction, val_seed)
        ds = torch.utils.data.Subset(ds, val_idx if split == "val" else train_idx)
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=g)[:limit].tolist()
        ds = torch.utils.data.Subset(ds, idx)
    return ds


def dataset_labels(ds: Dataset) -> torch.Tensor | int:
    """The labels of a dataset as a long tensor when it holds them (``labels`` / ``targets``), else its length."""
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = getattr(ds, "targets", None)
    if labels is None:
        return len(ds)  # type: ignore[arg-type]
    return torch.as_tensor(labels, dtype=torch.long)


def val_split_indices(labels: torch.Tensor | int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``round(fraction * n_c)`` samples of each class ``c`` go to val (stratified), drawn with a
    generator seeded by ``seed``; ``labels`` may be a sample count (no labels: one random draw). Both are sorted.

    Raises:
        ConfigError: the fraction leaves the validation or the training split empty.
    """
    from prunekit.errors import ConfigError

    g = torch.Generator().manual_seed(seed)
    if isinstance(labels, int):
        labels = torch.zeros(labels, dtype=torch.long)
    val: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        k = int(round(fraction * len(members)))
        val.append(members[torch.randperm(len(members), generator=g)[:k]])
    val_idx = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.long)
    n = len(labels)
    if len(val_idx) == 0 or len(val_idx) == n:
        empty = "validation" if len(val_idx) == 0 else "training"
        raise ConfigError(f"--val-fraction {fraction:g} leaves no {empty} samples out of {n}; choose a value in "
                          "(0, 1) that keeps both")
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return torch.nonzero(keep).flatten().tolist(), val_idx.tolist()


class TensorImageDataset(Dataset):
    """Images held as one tensor, normalised and augmented on the fly with torch ops (no PIL, deterministic
    under ``torch.manual_seed``).

    Args:
        images: uint8 [N, H, W] / [N, H, W, C] / [N, C, H, W], or float in [0, 1] [N, C, H, W].
        labels: int64 [N].
        augment: ``None``, ``"crop"`` (pad + random crop) or ``"crop+flip"`` (also horizontal flip).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int | None = None, augment: str | None = None, pad: int = 2,
                 channels_last_input: bool = False):
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if images.dim() == 3:
            images = images.unsqueeze(1)  # (N, 1, H, W)
        elif channels_last_input:
            images = images.permute(0, 3, 1, 2)
        if image_size and images.shape[-1] != image_size:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp_(0, 1)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images = ((images - m) / s).contiguous()  # (N, C, H, W), normalised once
        self.labels = labels.long()
        self.augment = augment
        self.pad = pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.augment:
            p = self.pad
            h, w = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))  # zero = the mean after normalisation
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, dy:dy + h, dx:dx + w]
            if "flip" in self.augment and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[i]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                workers: int = 0, distributed: bool = False) -> DataLoader:
    """A DataLoader whose order is a function of ``seed`` (and of the epoch: call ``loader.set_epoch(e)``)."""
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = _EpochSampler(len(dataset), seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
                        persistent_workers=workers > 0)
    return loader


class _EpochSampler(torch.utils.data.Sampler):
    """Random order seeded by (seed, epoch): a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


class DataArgs(Config):
    """Options shared by every stage that reads data. ``None`` means: as in the source run, else the default."""

    dataset: str | None = Field(None, description="dataset name (default: the source run's, else 'digits')")
    data_dir: Path | None = Field(None, description="where the dataset's files are (CIFAR, ImageNet, ...)")
    image_size: int | None = Field(None, gt=0, description="resize images to this size (default: the dataset's)")
    batch_size: int = Field(64, gt=0, description="batch size")
    download: bool = Field(False, description="download the dataset when it is not found locally")
    workers: int = Field(0, ge=0, description="data-loading worker processes")
    train_samples: int | None = Field(None, gt=0, description="train on a fixed random subset of this many "
                                      "training samples (the same subset in every run; default: all)")
    val_fraction: float | None = Field(None, gt=0, lt=1, description="share of the training data held out as the "
                                       f"validation split that picks epochs (default: the source run's, else "
                                       f"{VAL_FRACTION}); test figures come from the dataset's test split")
    val_seed: int | None = Field(None, description="seed of the validation split (default: the source run's, else "
                                 f"{VAL_SEED})")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str | None) -> str | None:
        if v is not None:
            DATASETS.get(v)  # raises with the valid names
        return v


def data_settings(cfg: Any, source_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dataset name, data_dir, image_size and the validation split (``val_fraction``, ``val_seed``) for a stage: its
    own flags, else the source run's, else the defaults. A fine-tune inherits its source's split, so its validation
    images are ones the source never trained on."""
    src = source_config or {}
    name = getattr(cfg, "dataset", None) or src.get("dataset") or "digits"
    data_dir = getattr(cfg, "data_dir", None) or src.get("data_dir")
    size = getattr(cfg, "image_size", None) or src.get("image_size") or dataset_info(name).image_size
    train_samples = getattr(cfg, "train_samples", None) or src.get("train_samples")
    val_fraction = _first(getattr(cfg, "val_fraction", None), src.get("val_fraction"), VAL_FRACTION)
    val_seed = _first(getattr(cfg, "val_seed", None), src.get("val_seed"), VAL_SEED)
    return {"dataset": name, "data_dir": data_dir, "image_size": int(size), "train_samples": train_samples,
            "val_fraction": float(val_fraction), "val_seed": int(val_seed)}


def _first(*values: Any) -> Any:
    """The first value that is not ``None`` (0 is a value: a seed of 0 given on the command line wins)."""
    return next(v for v in values if v is not None)
