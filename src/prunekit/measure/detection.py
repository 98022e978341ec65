"""Detection accuracy: mAP50 and mAP50-95 from predicted and true boxes, as COCO computes them.

Matching follows ``COCOeval.evaluateImg``: per image and class, detections in descending score order (at most
``max_dets`` of them) each take the still unmatched true box of highest IoU, if that IoU is at least the threshold.
Precision over recall is accumulated per class over all images and made monotone, then read at the 101 recall points
0, 0.01, ..., 1 (``method="coco"``: the precision at the first recall at or above each point, 0 past the last). AP is
averaged per class over the IoU thresholds 0.50:0.05:0.95, then over the classes that have true boxes.

``method="ultralytics"`` reads the same curve the way ``ultralytics.utils.metrics.compute_ap`` does (linear
interpolation between the curve's points plus the sentinels (0, 1) and (1, 0), integrated with the trapezoid rule):
it gives Ultralytics' figures for the same matches, e.g. 0.995 rather than 1.0 for a perfect detector.

Example:
    >>> m = detection_map([{"boxes": pb, "scores": ps, "labels": pl}], [{"boxes": gb, "labels": gl}])
    >>> m.map50, m.map50_95
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prunekit.errors import ConfigError

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # 0.50, 0.55, ..., 0.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
METHODS = ("coco", "ultralytics")


@dataclass
class DetectionMetrics:
    """``ap[c, t]``: the AP of class ``classes[c]`` at ``iou_thresholds[t]``; classes without true boxes are left
    out (as COCO does)."""

    map50: float
    map50_95: float
    ap: np.ndarray  # (C, T)
    classes: np.ndarray  # (C,) the class ids with at least one true box
    num_gt: np.ndarray  # (C,) their true boxes
    iou_thresholds: np.ndarray  # (T,)

    def as_dict(self) -> dict[str, float]:
        return {"map50": self.map50, "map50_95": self.map50_95}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4] (xyxy) -> [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray,
                     iou_thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """True positives of one image and one class, COCO's greedy rule: [P, T] bool, rows in the input order.

    Each detection, highest score first, takes the unmatched true box of highest IoU with IoU >= the threshold.
    """
    order = np.argsort(-np.asarray(pred_scores, np.float64), kind="mergesort")
    iou = box_iou(pred_boxes, gt_boxes)  # (P, G)
    tp = np.zeros((len(order), len(iou_thresholds)), bool)
    for t, thr in enumerate(iou_thresholds):
        taken = np.zeros(iou.shape[1], bool)
        for d in order:
            cand = np.where(taken, -1.0, iou[d])
            g = len(cand) - 1 - int(np.argmax(cand[::-1])) if cand.size else -1  # COCO: the last of equals
            if g >= 0 and cand[g] >= min(thr, 1 - 1e-10):
                taken[g] = True
                tp[d, t] = True
    return tp


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int, method: str = "coco") -> np.ndarray:
    """AP of one class from its detections over all images: ``tp`` [P, T] bool, ``scores`` [P] -> [T].

    Ties in score keep the given order (COCO's stable sort), so pass detections image by image.
    """
    tp = np.asarray(tp, bool)
    tp = tp[:, None] if tp.ndim == 1 else tp  # (P, T)
    if num_gt == 0:
        return np.full(tp.shape[1], np.nan)
    if len(scores) == 0:
        return np.zeros(tp.shape[1])
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    tpc = np.cumsum(tp[order], 0, dtype=np.float64)  # (P, T)
    fpc = np.cumsum(~tp[order], 0, dtype=np.float64)
    recall, precision = tpc / num_gt, tpc / (tpc + fpc)
    out = np.zeros(tp.shape[1])
    for t in range(tp.shape[1]):
        out[t] = _ap_from_curve(recall[:, t], precision[:, t], method)
    return out


def _ap_from_curve(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    if method == "coco":
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")
        q = np.where(idx < len(recall), envelope[np.minimum(idx, len(recall) - 1)], 0.0)
        return float(q.mean())
    # ultralytics.utils.metrics.compute_ap: sentinels, envelope, linear interpolation, trapezoid rule
    mrec = np.concatenate(([0.0], recall, [recall[-1]], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    y = np.interp(RECALL_POINTS, mrec, mpre)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(RECALL_POINTS)))


def detection_map(predictions: Sequence[Any], ground_truth: Sequence[Any], num_classes: int | None = None,
                  iou_thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS, method: str = "coco",
                  max_dets: int = 100) -> DetectionMetrics:
    """mAP50 and mAP50-95 over a set of images.

    Args:
        predictions: per image, ``{"boxes": [P, 4] xyxy, "scores": [P], "labels": [P]}`` (numpy or torch; the class
            key may also be ``classes``; an object with those attributes works too).
        ground_truth: per image, ``{"boxes": [G, 4] xyxy, "labels": [G]}`` (or ``classes``), same image order.
        num_classes: check that every class id is below it (optional).
        iou_thresholds: the IoU thresholds; mAP50 is read at 0.5, which must be among them.
        method: ``"coco"`` (101-point step interpolation) or ``"ultralytics"`` (Ultralytics' ``compute_ap``).
        max_dets: keep the ``max_dets`` best detections per image and class (COCO: 100).

    Raises:
        ConfigError: a bad ``method``, mismatched lengths, or a class id out of range.
    """
    if method not in METHODS:
        raise ConfigError(f"method = {method!r} is not a mAP method; choose from {', '.join(METHODS)}")
    if len(predictions) != len(ground_truth):
        raise ConfigError(f"predictions cover {len(predictions)} images, ground_truth {len(ground_truth)}: one entry "
                          "per image in each, in the same order")
    thr = np.asarray(iou_thresholds, np.float64)
    if not np.any(np.isclose(thr, 0.5)):
        raise ConfigError(f"iou_thresholds = {thr.tolist()} must include 0.5 (mAP50 is read there)")
    preds = [_arrays(p, True, num_classes, i) for i, p in enumerate(predictions)]
    gts = [_arrays(g, False, num_classes, i) for i, g in enumerate(ground_truth)]
    classes = np.unique(np.concatenate([g[2] for g in gts])) if gts else np.zeros(0, np.int64)
    ap = np.zeros((len(classes), len(thr)))
    num_gt = np.zeros(len(classes), np.int64)
    for ci, c in enumerate(classes):
        tps, scores = [], []
        for (pb, ps, pc), (gb, _, gc) in zip(preds, gts):
            keep = np.flatnonzero(pc == c)
            keep = keep[np.argsort(-ps[keep], kind="mergesort")][:max_dets]
            tps.append(match_detections(pb[keep], ps[keep], gb[gc == c], thr))
            scores.append(ps[keep])
            num_gt[ci] += int((gc == c).sum())
        ap[ci] = average_precision(np.concatenate(tps), np.concatenate(scores), int(num_gt[ci]), method)
    t50 = int(np.argmin(np.abs(thr - 0.5)))
    map50 = float(ap[:, t50].mean()) if len(classes) else 0.0
    map50_95 = float(ap.mean()) if len(classes) else 0.0
    return DetectionMetrics(map50, map50_95, ap, classes, num_gt, thr)


def _arrays(obj: Any, scored: bool, num_classes: int | None, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes [N, 4] float64, scores [N] (ones for ground truth), classes [N] int64) of one image's entry."""
    def get(*keys: str) -> Any:
        for k in keys:
            v = obj.get(k) if isinstance(obj, Mapping) else getattr(obj, k, None)
            if v is not None:
                return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        what = "predictions" if scored else "ground_truth"
        raise ConfigError(f"{what}[{i}] has no {' / '.join(repr(k) for k in keys)}; each entry needs 'boxes' (xyxy)"
                          f", {'scores, ' if scored else ''}'labels'")

    boxes = np.asarray(get("boxes"), np.float64).reshape(-1, 4)
    classes = np.asarray(get("labels", "classes"), np.int64).reshape(-1)
    scores = np.asarray(get("scores"), np.float64).reshape(-1) if scored else np.ones(len(classes))
    if not len(boxes) == len(classes) == len(scores):
        raise ConfigError(f"image {i}: {len(boxes)} boxes, {len(classes)} labels and {len(scores)} scores; one each "
                          "per object")
    if num_classes is not None and len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        bad = classes[(classes < 0) | (classes >= num_classes)][0]
        raise ConfigError(f"image {i}: class id {bad} is out of range; valid ids are 0..{num_classes - 1}")
    return boxes, scores, classes
