"""Dataset registry: ``digits`` (embedded default), ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``,
``imagenet``, ``imagefolder``.

Splits: ``train`` (augmented), ``calib`` (the training images without augmentation, for statistics) and ``val``.

Example:
    >>> ds = prunekit.data.get_dataset("digits", "train")
    >>> loader = prunekit.data.make_loader(ds, batch_size=64, shuffle=True, seed=0)
"""

from prunekit.data import sources  # noqa: F401  (registers the datasets)
from prunekit.data.core import (
    DATASETS,
    DataArgs,
    DatasetInfo,
    dataset_info,
    get_dataset,
    list_datasets,
    make_loader,
    register_dataset,
)

__all__ = ["DATASETS", "DataArgs", "DatasetInfo", "dataset_info", "get_dataset", "list_datasets", "make_loader",
           "register_dataset"]
