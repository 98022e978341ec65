"""Datasets: shapes, labels, fixed splits, clean calibration split, local-first loading and clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.data import dataset_info, get_dataset, list_datasets, make_loader
from prunekit.data.sources import DEBIAN_FASHION_MNIST, read_idx
from prunekit.errors import ConfigError, DataNotFoundError


def test_registry_lists_all_datasets():
    assert {"digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "imagefolder"} <= set(
        list_datasets())


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_labels_and_fixed_split(size):
    tr, te = get_dataset("digits", "train", image_size=size), get_dataset("digits", "test", image_size=size)
    va = get_dataset("digits", "val", image_size=size)
    assert len(tr) + len(va) + len(te) == 1797 and len(te) == 360
    x, y = tr[0]
    assert x.shape == (1, size, size) and x.dtype == torch.float32
    ys = torch.stack([te[i][1] for i in range(len(te))])
    assert set(ys.tolist()) == set(range(10))
    # the split is fixed: a second build gives the same test images
    te2 = get_dataset("digits", "test", image_size=size)
    torch.testing.assert_close(te.images, te2.images, rtol=0, atol=0)


def test_calib_split_is_train_images_without_augmentation():
    tr, cal = get_dataset("digits", "train"), get_dataset("digits", "calib")
    assert len(tr) == len(cal) and tr.indices == cal.indices  # the same images (a Subset: val is carved out)
    clean = cal.dataset.images[cal.indices[3]]
    torch.testing.assert_close(cal[3][0], cal[3][0], rtol=0, atol=0)
    torch.testing.assert_close(cal[3][0], clean, rtol=0, atol=0)
    torch.manual_seed(1)
    augmented = [tr[3][0] for _ in range(8)]
    assert any(not torch.equal(a, clean) for a in augmented)


def test_loader_order_is_a_function_of_seed_and_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    a, b = make_loader(ds, 10, shuffle=True, seed=3), make_loader(ds, 10, shuffle=True, seed=3)
    first = [x[0].tolist() for x in a]
    assert first == [x[0].tolist() for x in b]
    a.sampler.set_epoch(1)
    assert [x[0].tolist() for x in a] != first


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_format_reads_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    imgs, lbls = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", lbls)
    assert torch.equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), torch.from_numpy(lbls.astype(np.uint8)))
    ds = get_dataset("mnist", "test", data_dir=tmp_path)
    assert len(ds) == 20 and ds[0][0].shape == (1, 28, 28) and int(ds[5][1]) == lbls[5]


def test_missing_mnist_offline_says_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"not found.*--data-dir.*--download"):
        get_dataset("mnist", "train", data_dir=tmp_path / "nowhere")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    va = get_dataset("fashion-mnist", "test")
    assert len(va) == 10000 and va[0][0].shape == (1, 28, 28)
    assert dataset_info("fashion-mnist").num_classes == 10
    assert sorted(set(va.labels.tolist())) == list(range(10))


def test_imagefolder_requires_data_dir_and_reads_class_folders(tmp_path):
    from PIL import Image

    with pytest.raises(ConfigError, match="--data-dir is required"):
        get_dataset("imagefolder", "train")
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(d / f"{i}.png")
    ds = get_dataset("imagefolder", "test", data_dir=tmp_path, image_size=32)
    assert len(ds) == 4 and ds[0][0].shape == (3, 32, 32) and ds.classes == ["cat", "dog"]


def test_missing_cifar_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py.*--download"):
        get_dataset("cifar10", "train", data_dir=tmp_path)


def test_train_samples_keeps_the_same_subset_and_is_inherited(tmp_path):
    from prunekit.data.core import DataArgs, data_settings
    from prunekit.pipeline.stages import loaders

    data = data_settings(DataArgs(dataset="digits", train_samples=100))
    assert data["train_samples"] == 100
    a = loaders(data, batch_size=1000, splits=("train", "test"))
    b = loaders(data, batch_size=1000, splits=("train",))
    assert len(a["train"].dataset) == 100 and len(a["test"].dataset) > 100  # only the training split is cut
    assert a["train"].dataset.indices == b["train"].dataset.indices  # the same 100 images in every run
    assert sorted(a["train"].dataset.indices) != list(range(100))  # a random subset, not the first 100
    inherited = data_settings(DataArgs(), {"dataset": "digits", "train_samples": 100})
    assert inherited["train_samples"] == 100 and data_settings(DataArgs(), {})["train_samples"] is None
    with pytest.raises(Exception, match="train_samples"):
        DataArgs(train_samples=0)
