"""The generated detection set (Fashion-MNIST items on textured canvases, YOLO format) and the loading of YOLO / COCO
folders: exact files, byte-identical per seed, tight boxes of exact masks, disjoint sources, clear errors.

The Fashion-MNIST source is a small fake set of idx files written here (unique random items), so the tests are fast
and need neither the network nor Debian's package."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import prunekit.data.detection as det
from prunekit.data import get_dataset, list_datasets
from prunekit.data.detection import DetectionSetConfig, source_pools, write_yolo_dataset
from prunekit.data.detection_io import (
    DetectionDataset,
    collate_detection,
    load_coco_dataset,
    load_detection_folder,
    load_yolo_dataset,
)
from prunekit.errors import ConfigError, DataNotFoundError

SIZE = 64
SMALL = {"image_size": SIZE, "train": 6, "val": 3, "test": 3, "max_objects": 4}


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_items(rng: np.random.Generator, n: int) -> np.ndarray:
    """n unique 28x28 items: an ellipse of random size filled with random values above any threshold."""
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        ry, rx = rng.uniform(5, 13, 2)
        inside = ((yy - 14) / ry) ** 2 + ((xx - 14) / rx) ** 2 <= 1
        out[i][inside] = rng.integers(80, 256, inside.sum())
    return out


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", _fake_items(rng, n))
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_data_yaml(fmnist, tmp_path):
    path = write_yolo_dataset(tmp_path / "fd", data_dir=fmnist, **SMALL)
    root = tmp_path / "fd"
    assert path == root / "data.yaml"
    expected = {"data.yaml", "generator.json"}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for i in range(n):
            expected |= {f"images/{split}/{i:06d}.png", f"labels/{split}/{i:06d}.txt", f"instances/{split}/{i:06d}.png"}
    assert set(_files(root)) == expected
    spec = yaml.safe_load(path.read_text())
    assert spec["path"] == str(root.resolve()) and spec["nc"] == 10
    assert (spec["train"], spec["val"], spec["test"]) == ("images/train", "images/val", "images/test")
    assert spec["names"][0] == "T-shirt/top" and spec["names"][9] == "Ankle boot"
    im = Image.open(root / "images/train/000000.png")
    assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert not any(root.parent.glob(".fd.*")), "the temporary folder is gone"


def test_same_seed_gives_identical_files_and_another_seed_does_not(fmnist, tmp_path):
    a = _files(write_yolo_dataset(tmp_path / "a", data_dir=fmnist, **SMALL).parent)
    b = _files(write_yolo_dataset(tmp_path / "b", data_dir=fmnist, **SMALL).parent)
    c = _files(write_yolo_dataset(tmp_path / "c", data_dir=fmnist, seed=1, **SMALL).parent)
    a.pop("data.yaml"), b.pop("data.yaml"), c.pop("data.yaml")  # they name their own folder
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c[k] for k in images) == len(images)
    # one stream per image: a longer split starts with the same images
    d = _files(write_yolo_dataset(tmp_path / "d", data_dir=fmnist, **{**SMALL, "train": 8}).parent)
    assert all(d[k] == a[k] for k in images if k.startswith("images/train/"))


def test_boxes_are_the_tight_boxes_of_the_exact_masks(fmnist, tmp_path):
    cfg = DetectionSetConfig(**{**SMALL, "train": 12, "max_objects": 6, "max_occlusion": 0.3})
    root = write_yolo_dataset(tmp_path / "fd", cfg, data_dir=fmnist).parent
    seen = 0
    for lbl in sorted((root / "labels/train").glob("*.txt")):
        rows = np.loadtxt(lbl, ndmin=2)
        inst = np.asarray(Image.open(root / "instances/train" / f"{lbl.stem}.png"))
        assert set(np.unique(inst)) == set(range(len(rows) + 1)), "one mask id per label line, and background"
        rgb = np.asarray(Image.open(root / "images/train" / f"{lbl.stem}.png")).astype(int)
        for k, (cls, cx, cy, w, h) in enumerate(rows):
            ys, xs = np.nonzero(inst == k + 1)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / SIZE
            np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], box, atol=2e-6)
            assert 0 <= cls < 10 and max(w, h) * SIZE <= round(cfg.max_scale * SIZE) + 1
            seen += 1
        # the objects stand out: the masked pixels differ from the background's
        fg, bg = rgb[inst > 0].mean(0), rgb[inst == 0].mean(0)
        assert np.abs(fg - bg).max() > 20
    assert seen >= 12


def test_sources_of_the_splits_are_disjoint(fmnist):
    pools = source_pools(DetectionSetConfig(val_fraction=0.2), fmnist)
    keys = {s: {x.tobytes() for x in pools[s][0]} for s in pools}
    assert len(keys["train"]) == 240 and len(keys["val"]) == 60 and len(keys["test"]) == 100
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    # the val share is seeded
    other = source_pools(DetectionSetConfig(val_fraction=0.2, seed=3), fmnist)
    assert {x.tobytes() for x in other["val"][0]} != keys["val"]


def test_class_subset_is_renumbered(fmnist, tmp_path):
    path = write_yolo_dataset(tmp_path / "fd", data_dir=fmnist, classes=[5, 7], **SMALL)
    data = load_yolo_dataset(path, "train")
    assert data.names == ["Sandal", "Sneaker"]
    classes = np.concatenate([s.classes for s in data.samples])
    assert len(classes) >= 6 and set(classes.tolist()) <= {0, 1}


def test_segments_are_read_by_ultralytics(fmnist, tmp_path):
    utils = pytest.importorskip("ultralytics.data.utils")
    root = write_yolo_dataset(tmp_path / "fd", data_dir=fmnist, segments=True, **SMALL).parent
    for img in sorted((root / "images/val").glob("*.png")):
        lbl = root / "labels/val" / f"{img.stem}.txt"
        out = utils.verify_image_label((str(img), str(lbl), "", False, 10, 0, 0, False))
        lb, segments, msg = out[1], out[3], out[9]
        assert lb is not None and not msg, msg
        inst = np.asarray(Image.open(root / "instances/val" / f"{img.stem}.png"))
        assert len(segments) == len(lb) == inst.max()
        for k, seg in enumerate(segments):  # the polygon traces the mask: same box within a pixel
            ys, xs = np.nonzero(inst == k + 1)
            mask_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / SIZE
            seg_box = np.array([*seg.min(0), *seg.max(0)])
            np.testing.assert_allclose(seg_box, mask_box, atol=1.01 / SIZE)
    # and our loader reads the polygon rows as their boxes
    data = load_yolo_dataset(root / "data.yaml", "val")
    assert sum(len(s.boxes) for s in data.samples) == sum(1 for p in (root / "labels/val").glob("*.txt")
                                                        for _ in p.read_text().splitlines())


def test_bad_settings_and_missing_source_are_clear_errors(fmnist, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="min_objects = 5 is above max_objects = 2"):
        DetectionSetConfig(min_objects=5, max_objects=2)
    with pytest.raises(ConfigError, match=r"classes = \[3, 12\].*0 T-shirt/top"):
        DetectionSetConfig(classes=[3, 12])
    with pytest.raises(ConfigError, match="'image_size' = 8"):
        write_yolo_dataset(tmp_path / "x", data_dir=fmnist, image_size=8)
    monkeypatch.setattr(det, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        write_yolo_dataset(tmp_path / "x", image_size=SIZE)


def test_registered_name_generates_once_into_the_cache(fmnist, tmp_path, monkeypatch):
    assert "fashion-detect" in list_datasets()
    monkeypatch.setattr(det, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(det, "REGISTRY_SIZES", {"train": 5, "val": 2, "test": 3})
    val = get_dataset("fashion-detect", "val", data_dir=fmnist, image_size=SIZE)
    assert isinstance(val, DetectionDataset) and len(val) == 2  # its own val split, not carved from train
    assert len(get_dataset("fashion-detect", "train", data_dir=fmnist, image_size=SIZE)) == 5
    calib = get_dataset("fashion-detect", "calib", data_dir=fmnist, image_size=SIZE)
    assert [s.image for s in calib.data.samples] == [s.image for s in
                                                    get_dataset("fashion-detect", "train", data_dir=fmnist,
                                                                image_size=SIZE).data.samples]
    assert val.yaml_path is not None and val.yaml_path.is_file()
    stamp = os.stat(val.yaml_path).st_mtime_ns
    get_dataset("fashion-detect", "test", data_dir=fmnist, image_size=SIZE)
    assert os.stat(val.yaml_path).st_mtime_ns == stamp, "the cached set is reused"
    x, target = val[0]
    assert x.shape == (3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1
    assert target["boxes"].shape[1] == 4 and target["labels"].dtype == torch.int64
    assert len(target["boxes"]) == len(target["labels"]) >= 1
    images, targets = collate_detection([val[0], val[1]])
    assert images.shape == (2, 3, SIZE, SIZE) and len(targets) == 2


def test_yolo_folder_loads_boxes_in_pixels(fmnist, tmp_path):
    path = write_yolo_dataset(tmp_path / "fd", data_dir=fmnist, **SMALL)
    data = load_detection_folder(tmp_path / "fd", "test")
    assert len(data) == 3 and data.yaml_path == path and data.num_classes == 10
    s = data.samples[0]
    row = np.loadtxt(tmp_path / "fd/labels/test/000000.txt", ndmin=2)[0]
    cx, cy, w, h = row[1:] * SIZE
    np.testing.assert_allclose(s.boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-3)
    assert s.classes[0] == int(row[0]) and (s.width, s.height) == (SIZE, SIZE)
    resized = DetectionDataset(data, image_size=2 * SIZE)[0]
    torch.testing.assert_close(resized[1]["boxes"][0], torch.from_numpy(s.boxes[0]) * 2)


def _coco_folder(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (20, 20))):
        Image.new("RGB", size).save(root / "val2017" / name)
    spec = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.jpg", "width": 20, "height": 20}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 3, 3], "iscrowd": 0},
                            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1}]}
    (root / "annotations/instances_val2017.json").write_text(json.dumps(spec))
    return root


def test_coco_folder_loads_contiguous_classes(tmp_path):
    data = load_detection_folder(_coco_folder(tmp_path / "coco"), "val")
    assert data.names == ["cat", "dog"]  # category ids 3, 7 -> classes 0, 1
    a, b = data.samples
    assert a.image == tmp_path / "coco/val2017/a.jpg" and (a.width, a.height) == (40, 30)
    np.testing.assert_allclose(a.boxes, [[1, 2, 11, 7], [5, 5, 8, 8]])  # xywh -> xyxy; the crowd box left out
    assert a.classes.tolist() == [1, 0] and len(b.boxes) == 0
    with pytest.raises(ConfigError, match=r"instances_train\*\.json"):
        load_coco_dataset(tmp_path / "coco", "train")


def test_bad_folders_are_clear_errors(fmnist, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"'.*empty' is not a detection folder: .*data\.yaml.*instances_"):
        load_detection_folder(tmp_path / "empty")
    path = write_yolo_dataset(tmp_path / "fd", data_dir=fmnist, **SMALL)
    (tmp_path / "fd/labels/val/000001.txt").write_text("3 0.5 0.5 0.2\n")
    with pytest.raises(ConfigError, match=r"000001\.txt:1: '3 0\.5 0\.5 0\.2' is not 'cls cx cy w h'"):
        load_yolo_dataset(path, "val")
    (tmp_path / "fd/labels/val/000001.txt").write_text("12 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ConfigError, match=r"class 12 is out of range; valid ids are 0\.\.9"):
        load_yolo_dataset(path, "val")
    spec = yaml.safe_load(path.read_text())
    del spec["test"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="split 'test' is not in .*; it has train, val"):
        load_yolo_dataset(path, "test")
    with pytest.raises(ConfigError, match="not found"):
        load_yolo_dataset(tmp_path / "nope.yaml")
