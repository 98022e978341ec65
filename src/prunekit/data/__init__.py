"""Dataset registry: ``digits`` (embedded default), ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``,
``imagenet``, ``imagefolder``, ``fashion-detect`` (a generated detection set, ``prunekit.data.detection``).

Splits: ``train`` (augmented), ``calib`` (the training images without augmentation, for statistics), ``val`` (a
seeded, stratified share of the training data, disjoint from train and calib: it picks epochs) and ``test`` (the
held-out set: it is what is reported).

Example:
    >>> ds = prunekit.data.get_dataset("digits", "train")
    >>> loader = prunekit.data.make_loader(ds, batch_size=64, shuffle=True, seed=0)
"""

from prunekit.data import detection, sources  # noqa: F401  (registers the datasets)
from prunekit.data.core import (
    DATASETS,
    SPLITS,
    DataArgs,
    DatasetInfo,
    dataset_info,
    dataset_labels,
    get_dataset,
    list_datasets,
    make_loader,
    register_dataset,
    val_split_indices,
)
from prunekit.data.detection import DetectionSetConfig, write_yolo_dataset
from prunekit.data.detection_io import DetectionDataset, DetectionSet, load_detection_folder

__all__ = ["DATASETS", "SPLITS", "DataArgs", "DatasetInfo", "DetectionDataset", "DetectionSet", "DetectionSetConfig",
           "dataset_info", "dataset_labels", "get_dataset", "list_datasets", "load_detection_folder", "make_loader",
           "register_dataset", "val_split_indices", "write_yolo_dataset"]
