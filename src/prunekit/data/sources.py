"""The datasets themselves. Each loader looks locally first and downloads only when asked (``--download``)."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from prunekit.data.core import DatasetInfo, TensorImageDataset, register_dataset
from prunekit.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

# Where Debian's dataset-fashion-mnist package installs its idx files (`dpkg -L dataset-fashion-mnist`).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_CACHE = Path.home() / ".cache" / "prunekit"


# --------------------------------------------------------------------------------------------- digits (embedded)
@register_dataset(DatasetInfo("digits", 10, 1, 16, (0.3125,), (0.3780,),
                              description="bundled 8x8 handwritten digits (1 797), upsampled; seeded 80/20 split",
                              offline='yes: ships with scikit-learn'))
def digits(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), upsampled; a fixed seeded 80/20 stratified split
    into the training source (train / calib / val) and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)  # (1797, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    idx = idx_test if split == "test" else idx_train
    return TensorImageDataset(x[idx], y[idx], (0.3125,), (0.3780,), image_size=image_size,
                              augment="crop" if split == "train" else None, pad=max(1, image_size // 8))


# --------------------------------------------------------------------------------------------- MNIST-format
def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (optionally .gz): the MNIST/Fashion-MNIST format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise DataNotFoundError(f"{path} is not a uint8 idx file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return torch.from_numpy(arr.copy())


def _find_idx(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            for cand in (d / name, d / "raw" / name):
                if cand.is_file():
                    return cand
    return None


def _mnist_like(name: str, tv_class: str, split: str, data_dir: Path | None, image_size: int, download: bool,
                mean: float, std: float, flip: bool, system_dirs: list[Path], install_hint: str) -> Dataset:
    prefix = "t10k" if split == "test" else "train"
    dirs: list[Path] = []
    if data_dir:
        dirs += [data_dir, data_dir / tv_class, data_dir / name]
    dirs += system_dirs + [_CACHE / tv_class]
    img = _find_idx(f"{prefix}-images-idx3-ubyte", dirs)
    lbl = _find_idx(f"{prefix}-labels-idx1-ubyte", dirs)
    if (img is None or lbl is None) and download:
        import torchvision

        root = data_dir or _CACHE
        log.info("downloading %s to %s", name, root)
        getattr(torchvision.datasets, tv_class)(str(root), train=prefix == "train", download=True)
        img = _find_idx(f"{prefix}-images-idx3-ubyte", [root / tv_class])
        lbl = _find_idx(f"{prefix}-labels-idx1-ubyte", [root / tv_class])
    if img is None or lbl is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DataNotFoundError(
            f"{name}: {prefix}-images-idx3-ubyte(.gz) / {prefix}-labels-idx1-ubyte(.gz) not found "
            f"(looked in {looked}). "
            f"{install_hint}Or put the idx files in a folder and pass --data-dir DIR, or pass --download when online.")
    x, y = read_idx(img), read_idx(lbl)
    return TensorImageDataset(x, y, (mean,), (std,), image_size=image_size,
                              augment=("crop+flip" if flip else "crop") if split == "train" else None, pad=2)


@register_dataset(DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
                              description="Zalando's 28x28 clothing images (60 000 train, 10 000 test)",
                              offline="idx files in --data-dir or Debian's dataset-fashion-mnist, else --download"))
def fashion_mnist(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    return _mnist_like("fashion-mnist", "FashionMNIST", split, data_dir, image_size, download, 0.2860, 0.3530,
                       flip=True, system_dirs=[DEBIAN_FASHION_MNIST],
                       install_hint="Install them with `apt-get install dataset-fashion-mnist` (Debian). ")


@register_dataset(DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,),
                              description='28x28 handwritten digits (60 000 train, 10 000 test)',
                              offline='with idx files in --data-dir; else --download'))
def mnist(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    return _mnist_like("mnist", "MNIST", split, data_dir, image_size, download, 0.1307, 0.3081, flip=False,
                       system_dirs=[], install_hint="")


# --------------------------------------------------------------------------------------------- CIFAR
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cifar(tv_class: str, split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    import torchvision

    root = data_dir or _CACHE
    try:
        ds = getattr(torchvision.datasets, tv_class)(str(root), train=split != "test", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataNotFoundError(
            f"{tv_class}: not found under {root} ({e}). Put the python version of the dataset there "
            f"(e.g. {root}/cifar-10-batches-py) and pass --data-dir {root}, or pass --download when online.") from None
    x = torch.from_numpy(ds.data)  # (N, 32, 32, 3) uint8
    y = torch.tensor(ds.targets)
    return TensorImageDataset(x, y, _CIFAR_MEAN, _CIFAR_STD, image_size=image_size, channels_last_input=True,
                              augment="crop+flip" if split == "train" else None, pad=4)


@register_dataset(DatasetInfo("cifar10", 10, 3, 32, _CIFAR_MEAN, _CIFAR_STD,
                              description='32x32 colour images, 10 classes (50 000 train, 10 000 test)',
                              offline='with the python version in --data-dir; else --download'))
def cifar10(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    return _cifar("CIFAR10", split, data_dir, image_size, download)


@register_dataset(DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                              description='32x32 colour images, 100 classes (50 000 train, 10 000 test)',
                              offline='with the python version in --data-dir; else --download'))
def cifar100(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    return _cifar("CIFAR100", split, data_dir, image_size, download)


# --------------------------------------------------------------------------------------------- folders
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image_folder(name: str, split: str, data_dir: Path | None, image_size: int) -> Dataset:
    from torchvision import datasets, transforms

    if data_dir is None:
        raise ConfigError(f"--data-dir is required for dataset {name!r}: a folder with train/ and val/ "
                          "subfolders, one folder per class inside each")
    sub = data_dir / ("val" if split == "test" else "train")  # the held-out folder is the test split
    if not sub.is_dir():
        raise DataNotFoundError(f"{name}: {sub} does not exist; --data-dir must hold train/ and val/ class folders")
    norm = transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    resize = int(round(image_size / 0.875))
    if split == "train":
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])
    else:  # calib, val and test: the standard centre crop
        tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(),
                                 norm])
    return datasets.ImageFolder(str(sub), transform=tf)


@register_dataset(DatasetInfo("imagenet", 1000, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD,
                              description='ImageNet-1k in class folders (train/, val/), 224 px crops',
                              offline='with --data-dir only: never downloaded (own licence)'))
def imagenet(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    """ImageNet-1k in folder form (``train/nXXXXXXXX/*.JPEG``, ``val/nXXXXXXXX/*.JPEG``); never downloaded. The
    ``val/`` folder is the test split; the validation split is carved from ``train/``."""
    return _image_folder("imagenet", split, data_dir, image_size)


@register_dataset(DatasetInfo("imagefolder", 0, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD,
                              description='any train/ and val/ class folders of images',
                              offline='with --data-dir only: your own files'))
def imagefolder(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    """Any folder with ``train/`` and ``val/`` of class subfolders (number of classes read from it); ``val/`` is the
    test split, the validation split is carved from ``train/``."""
    return _image_folder("imagefolder", split, data_dir, image_size)
