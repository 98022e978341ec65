"""Detection data in one small in-memory form, read from a YOLO-format folder (``data.yaml``) or a COCO-format folder
(``annotations/instances_<split>*.json`` + images).

``DetectionSet`` holds, per image, its path, its size, its boxes (``xyxy`` in pixels, float32 ``[N, 4]``) and their
class ids (int64 ``[N]``, contiguous from 0), plus the class names. ``DetectionDataset`` serves it to torch:
``(image [3, H, W] float in [0, 1], {"boxes": [N, 4], "labels": [N]})``, torchvision's detection convention (class ids
stay 0-based; add 1 where a model keeps 0 for the background).

Example:
    >>> data = load_detection_folder("datasets/coco128", "val")
    >>> data.names[:2], data.samples[0].boxes.shape
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from prunekit.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
YOLO_SPLITS = ("train", "val", "test")
_EXPECT_YOLO = ("a YOLO-format folder holds data.yaml (keys: path, train, val, names) with images/<split>/*.png|jpg "
                "and labels/<split>/*.txt ('cls cx cy w h' normalised)")
_EXPECT_COCO = "a COCO-format folder holds annotations/instances_<split>*.json and its images"


@dataclass
class DetectionSample:
    """One image and its objects: ``boxes`` float32 [N, 4] xyxy in pixels, ``classes`` int64 [N]."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray


@dataclass
class DetectionSet:
    """A split of a detection dataset: its images with their objects, and the class names (index = class id)."""

    samples: list[DetectionSample]
    names: list[str]
    root: Path
    yaml_path: Path | None = None  # the data.yaml Ultralytics reads, when there is one
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.samples)


def load_detection_folder(path: str | Path, split: str = "val") -> DetectionSet:
    """Load ``split`` of a YOLO-format (``data.yaml``) or COCO-format (``annotations/instances_*.json``) folder.

    Raises:
        ConfigError: the path is neither, naming the path and what each format expects.
    """
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return load_yolo_dataset(p, split)
    if (p / "data.yaml").is_file():
        return load_yolo_dataset(p / "data.yaml", split)
    if (p / "annotations").is_dir():
        return load_coco_dataset(p, split)
    raise ConfigError(f"detection data {str(p)!r} is not a detection folder: {_EXPECT_YOLO}; {_EXPECT_COCO}")


# --------------------------------------------------------------------------------------------- YOLO format
def load_yolo_dataset(data_yaml: str | Path, split: str = "val") -> DetectionSet:
    """Read ``split`` of a YOLO-format dataset described by ``data_yaml`` (Ultralytics' layout: ``path``, ``train`` /
    ``val`` / ``test`` as image folders, image-list .txt files or lists of them, ``names`` as a list or a dict).
    An image without a label file has no objects; segment lines (``cls x1 y1 x2 y2 ...``) give their polygon's box.
    """
    data_yaml = Path(data_yaml)
    if not data_yaml.is_file():
        raise ConfigError(f"detection data: {str(data_yaml)!r} not found; {_EXPECT_YOLO}")
    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"detection data: {str(data_yaml)!r} is not valid YAML: {e}") from None
    if not isinstance(spec, dict) or "names" not in spec:
        raise ConfigError(f"detection data: {str(data_yaml)!r} has no 'names' (the class names); {_EXPECT_YOLO}")
    names = _yolo_names(spec["names"], data_yaml)
    if split not in YOLO_SPLITS or not spec.get(split):
        have = [s for s in YOLO_SPLITS if spec.get(s)]
        raise ConfigError(f"detection data: split {split!r} is not in {str(data_yaml)!r}; it has {', '.join(have)}")
    root = Path(spec.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    images = _yolo_images(spec[split], root, data_yaml, split)
    samples = [_yolo_sample(img, len(names)) for img in images]
    return DetectionSet(samples, names, root, yaml_path=data_yaml.resolve(), meta={"format": "yolo", "split": split})


def _yolo_names(names: Any, where: Path) -> list[str]:
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise ConfigError(f"detection data: 'names' in {str(where)!r} must be numbered 0..{len(ids) - 1}, got "
                              f"{ids}")
        return [str(names[k] if k in names else names[str(k)]) for k in ids]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ConfigError(f"detection data: 'names' in {str(where)!r} must be a list or a {{id: name}} mapping, got "
                      f"{names!r}")


def _yolo_images(entry: Any, root: Path, where: Path, split: str) -> list[Path]:
    """The image files of one split entry: a folder, a .txt list of images, or a list of those."""
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(item) if Path(item).is_absolute() else root / item
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
            out += [Path(ln) if Path(ln).is_absolute() else (root / ln).resolve() for ln in lines]
        else:
            raise ConfigError(f"detection data: {split} = {item!r} in {str(where)!r} resolves to {str(p)!r}, which "
                              "is neither an image folder nor a .txt list of images")
    if not out:
        raise ConfigError(f"detection data: split {split!r} of {str(where)!r} has no images "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    return out


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    idx = max((i for i, s in enumerate(parts) if s == "images"), default=None)
    if idx is None:
        return image.with_suffix(".txt")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def _yolo_sample(image: Path, num_classes: int) -> DetectionSample:
    from PIL import Image

    with Image.open(image) as im:  # reads the header only
        w, h = im.size
    lbl = label_path(image)
    boxes, classes = [], []
    lines = lbl.read_text().splitlines() if lbl.is_file() else []
    for n, line in enumerate(lines, 1):
        vals = line.split()
        if not vals:
            continue
        try:
            cls, coords = int(vals[0]), [float(v) for v in vals[1:]]
        except ValueError:
            cls, coords = -1, []
        if len(coords) < 4 or (len(coords) > 4 and len(coords) % 2):
            raise ConfigError(f"detection data: {lbl}:{n}: {line.strip()!r} is not 'cls cx cy w h' (normalised) "
                              "nor a segment 'cls x1 y1 x2 y2 ...'")
        if not 0 <= cls < num_classes:
            raise ConfigError(f"detection data: {lbl}:{n}: class {cls} is out of range; valid ids are "
                              f"0..{num_classes - 1} (the 'names' of data.yaml)")
        if len(coords) == 4:
            cx, cy, bw, bh = coords
            box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        else:
            xs, ys = coords[0::2], coords[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        boxes.append([box[0] * w, box[1] * h, box[2] * w, box[3] * h])
        classes.append(cls)
    return DetectionSample(image, w, h, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64))


# --------------------------------------------------------------------------------------------- COCO format
def load_coco_dataset(root: str | Path, split: str = "val") -> DetectionSet:
    """Read ``split`` of a COCO-format folder: ``annotations/instances_<split>*.json`` (e.g. ``instances_val2017``)
    with its images in ``<split>*/``, ``images/<split>*/``, ``images/`` or the folder itself. Category ids become
    contiguous class ids in id order; crowd annotations (``iscrowd=1``) are left out."""
    root = Path(root)
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not found:
        raise ConfigError(f"detection data: no annotations/instances_{split}*.json under {str(root)!r}; {_EXPECT_COCO}")
    ann_file = found[0]
    try:
        coco = json.loads(ann_file.read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        images = coco["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"detection data: {str(ann_file)!r} is not a COCO instances file (needs 'images', "
                          f"'annotations', 'categories'): {e}") from None
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[Any, list[dict]] = {im["id"]: [] for im in images}
    for a in coco.get("annotations", []):
        if not a.get("iscrowd", 0) and a.get("image_id") in per_image:
            per_image[a["image_id"]].append(a)
    image_dir = _coco_image_dir(root, ann_file.stem[len("instances_"):], images)
    samples = []
    for im in images:
        anns = per_image[im["id"]]
        boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
        classes = [cat_index[a["category_id"]] for a in anns]
        samples.append(DetectionSample(image_dir / im["file_name"], int(im["width"]), int(im["height"]),
                                       np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)))
    return DetectionSet(samples, [str(c["name"]) for c in cats], root, meta={"format": "coco", "split": split,
                                                                            "category_ids": [c["id"] for c in cats]})


def _coco_image_dir(root: Path, tag: str, images: list[dict]) -> Path:
    candidates = [root / tag, root / "images" / tag, root / "images", root]
    if not images:
        return candidates[0]
    first = images[0]["file_name"]
    for d in candidates:
        if (d / first).is_file():
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise ConfigError(f"detection data: image {first!r} of annotations/instances_{tag}.json not found (looked in "
                      f"{looked}); {_EXPECT_COCO}")


# --------------------------------------------------------------------------------------------- torch dataset
class DetectionDataset(Dataset):
    """A ``DetectionSet`` for torch: ``(image [3, H, W] float in [0, 1], {"boxes": [N, 4] xyxy px, "labels": [N]})``.

    Args:
        data: the loaded split.
        image_size: resize every image to this square size (boxes scaled with it); ``None`` keeps each image's size.
    """

    def __init__(self, data: DetectionSet, image_size: int | None = None):
        self.data = data
        self.names = data.names
        self.num_classes = data.num_classes
        self.yaml_path = data.yaml_path
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from PIL import Image

        s = self.data.samples[i]
        with Image.open(s.image) as im:
            im = im.convert("RGB")
            if self.image_size:
                im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        boxes = torch.from_numpy(s.boxes.copy())
        if self.image_size:
            boxes *= torch.tensor([self.image_size / s.width, self.image_size / s.height] * 2)
        return x, {"boxes": boxes, "labels": torch.from_numpy(s.classes.copy())}


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[Any, list[dict]]:
    """A batch: the images stacked when they share a size (else a list, as torchvision detectors take) and the
    list of targets."""
    images = [b[0] for b in batch]
    same = all(x.shape == images[0].shape for x in images)
    return (torch.stack(images) if same else images), [b[1] for b in batch]
