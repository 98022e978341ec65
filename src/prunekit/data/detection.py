"""A generated detection set that is real to a model: Fashion-MNIST items pasted on textured canvases, written in
YOLO format, and the ``fashion-detect`` dataset name.

Each image is an RGB canvas (smooth noise, stripes or a gradient, plus pixel noise) with a few Fashion-MNIST items,
each cropped to its own silhouette, scaled, tinted and pasted through its mask (pixels above ``threshold``). Objects may
overlap, but every object keeps at least ``1 - max_occlusion`` of its pixels visible; its box is the tight box of its
visible pixels and its mask is exactly those pixels. Train objects come from Fashion-MNIST's train split, val objects
from a seeded share of that split kept apart (``val_fraction``), test objects from its test split: no source image is
in two splits. One seed gives byte-identical files.

Layout (what Ultralytics reads)::

    out_dir/data.yaml                 path, train, val, test, names (+ nc)
    out_dir/images/{train,val,test}/000000.png
    out_dir/labels/{train,val,test}/000000.txt    'cls cx cy w h' normalised ('cls x1 y1 ...' with segments=True)
    out_dir/instances/{train,val,test}/000000.png uint8 instance map: 0 background, k = the object on label line k
    out_dir/generator.json            the settings that made it

Example:
    >>> yaml_path = write_yolo_dataset("runs/fashion-detect", image_size=96, train=200, val=40, test=40)
    >>> ds = prunekit.data.get_dataset("fashion-detect", "val")  # generated once into the cache, then reused
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from prunekit.config import Config
from prunekit.data.core import DatasetInfo, register_dataset
from prunekit.data.detection_io import DetectionDataset, load_yolo_dataset
from prunekit.data.sources import DEBIAN_FASHION_MNIST, read_idx
from prunekit.errors import ConfigError, DataNotFoundError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CACHE = Path.home() / ".cache" / "prunekit" / "fashion-detect"  # where get_dataset("fashion-detect") writes
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
REGISTRY_SIZES = {"train": 1000, "val": 200, "test": 200}  # images per split of the registered ``fashion-detect``


class DetectionSetConfig(Config):
    """Settings of the generated detection set (each a keyword of ``write_yolo_dataset``)."""

    image_size: int = Field(128, ge=32, le=1024, description="canvas side in pixels")
    min_objects: int = Field(1, ge=1, description="fewest objects in an image")
    max_objects: int = Field(4, ge=1, le=32, description="most objects in an image")
    min_scale: float = Field(0.2, gt=0, le=1, description="smallest object (longest side) as a share of the image")
    max_scale: float = Field(0.5, gt=0, le=1, description="largest object (longest side) as a share of the image")
    train: int = Field(1000, ge=1, description="number of training images")
    val: int = Field(200, ge=1, description="number of validation images")
    test: int = Field(200, ge=1, description="number of test images")
    classes: list[int] | None = Field(None, description="Fashion-MNIST class ids to use (default: all 10); they "
                                      "become ids 0..k-1 in this order")
    seed: int = Field(0, description="seed of everything: the same seed gives byte-identical files")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of Fashion-MNIST's train images that is the "
                                "validation split's source (disjoint from the train split's)")
    max_occlusion: float = Field(0.3, ge=0, lt=1, description="largest share of an object that later objects may "
                                 "cover")
    threshold: int = Field(32, ge=0, le=254, description="an item's pixels above this value (0..255) are its mask")
    segments: bool = Field(False, description="write YOLO-seg labels (class + polygon of the visible mask) instead "
                           "of boxes (needs opencv, in prunekit[detect])")

    @model_validator(mode="after")
    def _ranges(self) -> DetectionSetConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects = {self.min_objects} is above max_objects = {self.max_objects}")
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale = {self.min_scale} is above max_scale = {self.max_scale}")
        bad = [c for c in self.classes or [] if not 0 <= c < len(FASHION_CLASSES)]
        if bad or (self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes))):
            raise ValueError(f"classes = {self.classes} must be distinct Fashion-MNIST ids, from 0..9: "
                             + ", ".join(f"{i} {n}" for i, n in enumerate(FASHION_CLASSES)))
        return self

    def class_ids(self) -> list[int]:
        return list(self.classes) if self.classes is not None else list(range(len(FASHION_CLASSES)))


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_arrays(split: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``train`` or ``test`` split as (images uint8 [N, 28, 28], labels int64 [N]), read from the idx
    files in ``data_dir``, Debian's ``dataset-fashion-mnist`` or the cache.

    Raises:
        DataNotFoundError: the idx files are nowhere, naming where it looked and how to get them.
    """
    prefix = "t10k" if split == "test" else "train"
    dirs = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"] if data_dir else []
    dirs += [DEBIAN_FASHION_MNIST, Path.home() / ".cache" / "prunekit" / "FashionMNIST" / "raw"]
    found = {}
    for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        hits = [d / n for d in dirs for n in (stem + ".gz", stem) if (d / n).is_file()]
        if not hits:
            raise DataNotFoundError(
                f"fashion-detect: Fashion-MNIST {stem}(.gz) not found (looked in {', '.join(map(str, dirs))}). "
                "Install it with `apt-get install dataset-fashion-mnist` (Debian), or put the idx files in a folder "
                "and pass --data-dir DIR (or data_dir=...).")
        found[kind] = hits[0]
    return read_idx(found["images"]).numpy(), read_idx(found["labels"]).numpy().astype(np.int64)


def source_pools(cfg: DetectionSetConfig, data_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Per split, (Fashion-MNIST images, their class ids in this set) that its objects are drawn from: train and
    val from disjoint seeded parts of Fashion-MNIST's train split, test from its test split."""
    ids = cfg.class_ids()
    remap = np.full(len(FASHION_CLASSES), -1, np.int64)
    remap[ids] = np.arange(len(ids))
    x_tr, y_tr = fashion_mnist_arrays("train", data_dir)
    x_te, y_te = fashion_mnist_arrays("test", data_dir)
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(y_tr))
    n_val = int(round(cfg.val_fraction * len(y_tr)))
    parts = {"train": (x_tr, y_tr, np.sort(perm[n_val:])), "val": (x_tr, y_tr, np.sort(perm[:n_val])),
             "test": (x_te, y_te, np.arange(len(y_te)))}
    out = {}
    for split, (x, y, idx) in parts.items():
        idx = idx[remap[y[idx]] >= 0]  # the chosen classes only
        out[split] = (x[idx], remap[y[idx]])
    return out


# --------------------------------------------------------------------------------------------- rendering
def _texture(rng: np.random.Generator, size: int, light: bool) -> np.ndarray:
    """A background (H, W, 3) float32 in [0, 1]: smooth noise, stripes or a gradient between two colours."""
    from PIL import Image

    lo, hi = (0.45, 0.95) if light else (0.05, 0.55)
    c1, c2 = rng.uniform(lo, hi, 3).astype(np.float32), rng.uniform(lo, hi, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind, theta = int(rng.integers(3)), rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == 0:  # smooth noise: a coarse random grid, upsampled
        k = int(rng.integers(3, 9))
        grid = Image.fromarray(rng.uniform(0, 1, (k, k)).astype(np.float32), mode="F")
        t = np.clip(np.asarray(grid.resize((size, size), Image.BICUBIC)), 0, 1)
    elif kind == 1:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(0.04, 0.25) + rng.uniform(0, 2 * np.pi))
    else:  # linear gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    img = c1 + t[..., None].astype(np.float32) * (c2 - c1)  # (H, W, 3)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _object_patch(item: np.ndarray, side: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """An item cropped to its silhouette and scaled so its longest side is ``side``: (intensity [h, w] in [0, 1],
    mask [h, w] bool)."""
    from PIL import Image

    ys, xs = np.nonzero(item > threshold)
    crop = item[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    f = side / max(h, w)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
    r = np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))
    return r.astype(np.float32) / 255.0, r > threshold


def _place(rng: np.random.Generator, owner: np.ndarray, areas: list[int], mask: np.ndarray,
           max_occlusion: float, tries: int = 30) -> tuple[int, int] | None:
    """A top-left corner where ``mask`` leaves every earlier object at least ``1 - max_occlusion`` visible."""
    size = owner.shape[0]
    ph, pw = mask.shape
    visible = np.bincount(owner[owner >= 0], minlength=len(areas)) if areas else np.zeros(0, np.int64)
    for _ in range(tries):
        y, x = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
        under = owner[y:y + ph, x:x + pw][mask]
        covered = np.bincount(under[under >= 0], minlength=len(areas))
        if np.all(visible - covered >= (1 - max_occlusion) * np.asarray(areas)):
            return y, x
    return None


def render_image(rng: np.random.Generator, cfg: DetectionSetConfig, items: np.ndarray,
                 labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: (RGB uint8 [S, S, 3], owner map int16 [S, S] (-1 background, k object k), class id per object)."""
    size = cfg.image_size
    light = bool(rng.random() < 0.35)  # dark objects on a light background, else light on dark
    canvas = _texture(rng, size, light)
    owner = np.full((size, size), -1, np.int16)
    areas: list[int] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        j = int(rng.integers(len(labels)))
        side = max(4, int(round(rng.uniform(cfg.min_scale, cfg.max_scale) * size)))
        value, mask = _object_patch(items[j], side, cfg.threshold)
        hue, sat = rng.uniform(), rng.uniform(0.3, 1.0)
        val = rng.uniform(0.05, 0.35) if light else rng.uniform(0.65, 1.0)
        colour = np.asarray(colorsys.hsv_to_rgb(hue, sat, val), np.float32)
        at = _place(rng, owner, areas, mask, cfg.max_occlusion)
        if at is None or not mask.any():
            continue
        y, x = at
        ph, pw = mask.shape
        region = canvas[y:y + ph, x:x + pw]
        region[mask] = colour * (0.55 + 0.45 * value[mask, None])  # the item's own shading, tinted
        owner[y:y + ph, x:x + pw][mask] = len(areas)
        areas.append(int(mask.sum()))
        classes.append(int(labels[j]))
    rgb = (np.clip(canvas, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    return rgb, owner, classes


def object_boxes(owner: np.ndarray, n: int) -> np.ndarray:
    """The tight box of each object's visible pixels, xyxy in pixel edges (a pixel at column c spans c..c+1)."""
    boxes = np.zeros((n, 4), np.float32)
    for k in range(n):
        ys, xs = np.nonzero(owner == k)
        boxes[k] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def _label_lines(owner: np.ndarray, classes: list[int], segments: bool) -> list[str]:
    size = owner.shape[0]
    if not segments:
        out = []
        for c, (x1, y1, x2, y2) in zip(classes, object_boxes(owner, len(classes))):
            cx, cy, w, h = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size
            out.append(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        return out
    import cv2

    out = []
    for k, c in enumerate(classes):
        contours, _ = cv2.findContours((owner == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)  # largest visible part
        if len(pts) < 3:  # a sliver: its box corners (Ultralytics reads 2 points as a box row)
            ys, xs = np.nonzero(owner == k)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
            pts = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)
        pts = (pts + 0.5) / size  # pixel centres, normalised
        out.append(f"{c} " + " ".join(f"{v:.6f}" for v in pts.reshape(-1)))
    return out


# --------------------------------------------------------------------------------------------- writing
def write_yolo_dataset(out_dir: str | Path, config: DetectionSetConfig | None = None, *,
                       data_dir: str | Path | None = None, **options: Any) -> Path:
    """Generate the set into ``out_dir`` (replacing it) and return the path of its ``data.yaml``.

    Args:
        out_dir: the folder to write.
        config: the settings; or give them as keywords (``image_size=96, train=200, seed=1``).
        data_dir: a folder holding Fashion-MNIST's idx files (default: Debian's, then the cache).

    Example:
        >>> write_yolo_dataset("/tmp/fd", image_size=64, train=8, val=4, test=4)  # PosixPath('/tmp/fd/data.yaml')
    """
    cfg = config.updated(options, "write_yolo_dataset") if config is not None else DetectionSetConfig(**options)
    if cfg.segments:
        _require_cv2()
    out = Path(out_dir).resolve()
    pools = source_pools(cfg, data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, n in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
            _write_split(tmp, split, n, cfg, *pools[split])
        _write_meta(tmp, out, cfg)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # appears whole or not at all
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "data.yaml"


def _write_split(root: Path, split: str, n: int, cfg: DetectionSetConfig, items: np.ndarray,
                 labels: np.ndarray) -> None:
    from PIL import Image

    for sub in ("images", "labels", "instances"):
        (root / sub / split).mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], i])  # one stream per image: any image is
        rgb, owner, classes = render_image(rng, cfg, items, labels)  # the same whatever the split's length
        stem = f"{i:06d}"
        Image.fromarray(rgb, mode="RGB").save(root / "images" / split / f"{stem}.png", format="PNG",
                                              compress_level=1)  # noisy canvases: level 1 is 3x faster, ~same size
        Image.fromarray((owner + 1).astype(np.uint8), mode="L").save(root / "instances" / split / f"{stem}.png",
                                                                    format="PNG")
        lines = _label_lines(owner, classes, cfg.segments)
        (root / "labels" / split / f"{stem}.txt").write_text("".join(ln + "\n" for ln in lines))


def _write_meta(tmp: Path, out: Path, cfg: DetectionSetConfig) -> None:
    names = [FASHION_CLASSES[c] for c in cfg.class_ids()]
    spec = {"path": str(out), "train": "images/train", "val": "images/val", "test": "images/test",
            "nc": len(names), "names": dict(enumerate(names))}
    (tmp / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp / "generator.json").write_text(json.dumps({"generator": "prunekit.data.detection",
                                                    **cfg.model_dump(mode="json")}, indent=1) + "\n")


def _require_cv2() -> None:
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise ConfigError("segments = True needs opencv (cv2) to trace the mask polygons; install it with "
                          "`pip install prunekit[detect]`, or use segments = False (boxes; instances/ holds "
                          "the exact masks either way)") from None


def cached_yolo_dataset(cfg: DetectionSetConfig, data_dir: str | Path | None = None,
                        cache: Path | None = None) -> Path:
    """The ``data.yaml`` of the set ``cfg`` describes, generated into ``cache`` (default ``CACHE``) on first use."""
    key = hashlib.sha1(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cache or CACHE) / f"{cfg.image_size}px-seed{cfg.seed}-{key}"
    if (out / "data.yaml").is_file() and (out / "generator.json").is_file():
        return out / "data.yaml"
    return write_yolo_dataset(out, cfg, data_dir=data_dir)


@register_dataset(DatasetInfo("fashion-detect", len(FASHION_CLASSES), 3, 128,
                              description="generated detection set: 1-4 Fashion-MNIST items on textured 128 px "
                                          "canvases, YOLO format (1 000 train, 200 val, 200 test)",
                              offline="yes: generated from Debian's dataset-fashion-mnist (or --data-dir)",
                              task="detect"))
def fashion_detect(split: str, data_dir: Path | None, image_size: int, download: bool) -> Dataset:
    """The generated set at ``image_size`` (cached); ``calib`` is the train split. Its own val split is used
    (``--val-fraction`` does not apply); Ultralytics reads ``dataset.yaml_path``."""
    yaml_path = cached_yolo_dataset(DetectionSetConfig(image_size=image_size, **REGISTRY_SIZES), data_dir)
    return DetectionDataset(load_yolo_dataset(yaml_path, "train" if split == "calib" else split))
