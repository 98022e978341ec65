"""mAP50 and mAP50-95: hand-made cases worked out in the comments, COCO's matching rule, and a cross-check against
Ultralytics' ``ap_per_class`` (its own interpolation reproduced exactly by ``method="ultralytics"``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.errors import ConfigError
from prunekit.measure.detection import IOU_THRESHOLDS, box_iou, detection_map, match_detections


def _gt(boxes, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "labels": np.asarray(labels, int)}


def _pred(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
            "labels": np.asarray(labels, int)}


def test_box_iou_by_hand():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_perfect_predictions_give_one():
    gts = [_gt([[0, 0, 10, 10], [20, 20, 40, 50]], [0, 1]), _gt([[5, 5, 9, 9]], [1])]
    preds = [_pred(g["boxes"], np.linspace(0.9, 0.5, len(g["labels"])), g["labels"]) for g in gts]
    m = detection_map(preds, gts)
    assert m.map50 == 1.0 and m.map50_95 == 1.0
    assert m.classes.tolist() == [0, 1] and m.num_gt.tolist() == [1, 2]


def test_one_hit_one_miss():
    # 2 true boxes of one class; the best detection hits one, the second lands nowhere. Precision 1 up to recall
    # 0.5, and recall never passes 0.5: 51 of the 101 recall points (0.00 .. 0.50) read 1, the rest 0 -> 51/101,
    # at every IoU threshold.
    gts = [_gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])]
    preds = [_pred([[0, 0, 10, 10], [100, 100, 110, 110]], [0.9, 0.8], [0, 0])]
    m = detection_map(preds, gts)
    assert m.map50 == pytest.approx(51 / 101) and m.map50_95 == pytest.approx(51 / 101)


def test_a_false_positive_ranked_first_halves_precision():
    # detections: a miss (0.9) then the hit (0.8): recall reaches 1 at precision 1/2, and the envelope carries 1/2
    # back to recall 0 -> AP = 0.5 everywhere
    m = detection_map([_pred([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])], [_gt([[0, 0, 10, 10]], [0])])
    assert m.map50 == pytest.approx(0.5) and m.map50_95 == pytest.approx(0.5)


def test_iou_0_72_counts_at_five_of_ten_thresholds():
    # IoU = 72 / 100 = 0.72: a hit at 0.50, 0.55, 0.60, 0.65, 0.70 (AP 1) and a miss at 0.75 .. 0.95 (AP 0)
    m = detection_map([_pred([[0, 0, 100, 72]], [0.7], [0])], [_gt([[0, 0, 100, 100]], [0])])
    assert m.map50 == 1.0 and m.map50_95 == pytest.approx(0.5)
    np.testing.assert_array_equal(m.ap[0], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_classes_are_averaged_and_classes_without_truth_ignored():
    # class 0 found, class 1 missed (AP 0), class 2 only predicted (no true box: left out, as COCO does) -> 0.5
    gts = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    preds = [_pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 2])]
    m = detection_map(preds, gts)
    assert m.classes.tolist() == [0, 1] and m.map50 == pytest.approx(0.5) and m.map50_95 == pytest.approx(0.5)


def test_coco_matching_takes_the_best_free_truth_in_score_order():
    gt = np.array([[0, 0, 10, 10], [6, 0, 16, 10]], float)
    # d0 (0.9) overlaps gt0 with IoU 90/100 and gt1 with 40/150: takes gt0. d1 (0.8) sits on gt0 (IoU 1) but gt0 is
    # taken; its IoU with gt1 is 40/160 = 0.25 < 0.5: a false positive
    det = np.array([[1, 0, 10, 10], [0, 0, 10, 10]], float)
    tp = match_detections(det, np.array([0.9, 0.8]), gt, np.array([0.5]))
    assert tp[:, 0].tolist() == [True, False]
    # rank d1 first: it takes gt0, and d0 (IoU 0.27 with gt1) misses
    tp = match_detections(det, np.array([0.7, 0.8]), gt, np.array([0.5]))
    assert tp[:, 0].tolist() == [False, True]


def test_torch_tensors_and_max_dets():
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    # the hit has the lowest score of 3: with max_dets=2 it is cut, and AP is 0
    preds = [{"boxes": torch.tensor([[50.0, 50, 60, 60], [70.0, 70, 80, 80], [0.0, 0, 10, 10]]),
              "scores": torch.tensor([0.9, 0.8, 0.1]), "classes": torch.tensor([0, 0, 0])}]
    assert detection_map(preds, gts).map50 == pytest.approx(1 / 3)  # precision 1/3 at recall 1
    assert detection_map(preds, gts, max_dets=2).map50 == 0.0


def test_bad_inputs_are_clear_errors():
    gts = [_gt([[0, 0, 10, 10]], [0])]
    with pytest.raises(ConfigError, match="method = 'voc' is not a mAP method; choose from coco, ultralytics"):
        detection_map(gts, gts, method="voc")
    with pytest.raises(ConfigError, match="predictions cover 2 images, ground_truth 1"):
        detection_map([gts[0], gts[0]], gts)
    with pytest.raises(ConfigError, match=r"predictions\[0\] has no 'scores'"):
        detection_map(gts, gts)
    with pytest.raises(ConfigError, match=r"class id 4 is out of range; valid ids are 0\.\.2"):
        detection_map([_pred([[0, 0, 1, 1]], [1], [4])], gts, num_classes=3)


def _random_case(seed: int, images: int = 30, classes: int = 3):
    """True boxes, and detections: most true boxes jittered (some hard to match at high IoU), plus false ones."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(images):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(10, 60, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, classes, n)
        found = rng.random(n) < 0.8
        jitter = boxes[found] + rng.normal(0, 3, (int(found.sum()), 4))
        m = int(rng.integers(0, 4))
        fxy = rng.uniform(0, 200, (m, 2))
        false = np.concatenate([fxy, fxy + rng.uniform(10, 60, (m, 2))], 1)
        gts.append(_gt(boxes, labels))
        preds.append(_pred(np.concatenate([jitter, false]), rng.random(int(found.sum()) + m),
                           np.concatenate([labels[found], rng.integers(0, classes, m)])))
    return preds, gts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_check_with_ultralytics_ap_per_class(seed):
    metrics = pytest.importorskip("ultralytics.utils.metrics")
    preds, gts = _random_case(seed)
    # our COCO matches, in Ultralytics' layout: one row per detection, one column per IoU threshold
    tp, conf, pred_cls = [], [], []
    for p, g in zip(preds, gts):
        for c in np.unique(np.concatenate([p["labels"], g["labels"]])):
            k = p["labels"] == c
            tp.append(match_detections(p["boxes"][k], p["scores"][k], g["boxes"][g["labels"] == c], IOU_THRESHOLDS))
            conf.append(p["scores"][k])
            pred_cls.append(p["labels"][k])
    target_cls = np.concatenate([g["labels"] for g in gts])
    ap = metrics.ap_per_class(np.concatenate(tp), np.concatenate(conf), np.concatenate(pred_cls), target_cls)[5]
    ours = detection_map(preds, gts, method="ultralytics")
    np.testing.assert_allclose(ours.ap, ap, rtol=0, atol=1e-9)  # the same figures, per class and threshold
    # COCO's step reading of the same curve differs from Ultralytics' interpolation by well under a point here
    coco = detection_map(preds, gts)
    assert 0.2 < coco.map50_95 < 0.9
    assert abs(coco.map50 - ap[:, 0].mean()) < 0.01 and abs(coco.map50_95 - ap.mean()) < 0.01


def test_ultralytics_method_on_a_perfect_detector_gives_its_0_995():
    # Ultralytics' trapezoid over the sentinel (1, 0) loses half of the last 0.01 recall step
    m = detection_map([_pred([[0, 0, 10, 10]], [0.9], [0])], [_gt([[0, 0, 10, 10]], [0])], method="ultralytics")
    assert m.map50 == pytest.approx(0.995) and m.map50_95 == pytest.approx(0.995)
