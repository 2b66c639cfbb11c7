"""Detection metrics on hand-made cases: IoU, Hungarian matching, counts, AP@0.5, RMSE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from needlework.metrics import (
    DetectionMetrics,
    average_precision,
    box_iou,
    match_detections,
    reconstruction_rmse,
)
from needlework.metrics.detection import greedy_true_positives


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 20], [3, 3, 3, 3]])
    got = box_iou(a, b)[0].tolist()
    assert got == pytest.approx([1.0, 50 / 150, 0.0, 0.5, 0.0])
    assert box_iou(b, a).shape == (5, 1)


def test_hungarian_beats_greedy():
    # gt A, B; pred0 overlaps A strongly and B a little, pred1 overlaps only A.
    gt = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10]])
    pred = torch.tensor([[1.0, 0, 11, 10], [-1, 0, 9, 10]])
    iou = box_iou(pred, gt)
    assert iou[0, 0] > iou[0, 1] >= 0.5 and iou[1, 0] >= 0.5 and iou[1, 1] < 0.5  # the intended geometry
    pi, gi = match_detections(pred, gt)
    assert sorted(zip(pi.tolist(), gi.tolist())) == [(0, 1), (1, 0)]  # both matched
    # VOC greedy matching (for AP) takes A for pred0 first and leaves pred1 unmatched
    tp = greedy_true_positives(pred, torch.tensor([0.9, 0.8]), gt)
    assert tp.tolist() == [True, False]


def test_match_threshold_is_inclusive_and_one_to_one():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    pred = torch.tensor([[0.0, 0, 10, 20], [0, 0, 10, 10]])  # IoU 0.5 and 1.0
    pi, gi = match_detections(pred, gt)
    assert pi.tolist() == [1] and gi.tolist() == [0]
    pi, gi = match_detections(pred[:1], gt)  # exactly 0.5 counts
    assert pi.tolist() == [0]
    pi, _ = match_detections(pred[:1], gt, iou_threshold=0.51)
    assert pi.tolist() == []
    assert match_detections(pred[:0], gt)[0].size == 0


def test_detection_metrics_counts_and_padding():
    gt_boxes = torch.tensor(
        [
            [[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 0, 0]],
            [[5.0, 5, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ]
    )
    gt_labels = torch.tensor([[1, 2, 3, -1], [7, -1, -1, -1]])
    pred_boxes = torch.tensor(
        [
            [[0.0, 0, 10, 10], [21, 21, 31, 31], [60, 60, 70, 70]],  # 2 matched (1 right), 1 miss
            [[5.0, 5, 15, 15], [0, 0, 1, 1], [0, 0, 1, 1]],  # the padding row (0,0,0,0) must not match
        ]
    )
    pred_labels = torch.tensor([[1, 9, 3], [7, 0, 0]])
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.95, 0.1, 0.1]])
    m = DetectionMetrics()
    m.update(pred_boxes, pred_labels, scores, gt_boxes, gt_labels)
    r = m.compute()
    assert r["n_ground_truth"] == 4
    assert r["detection"] == pytest.approx(3 / 4)
    assert r["classification"] == pytest.approx(2 / 3)
    assert r["both"] == pytest.approx(2 / 4)
    # ranked: 0.95 TP, 0.9 TP, 0.8 TP, 0.7 FP, 0.1 FP, 0.1 FP with 4 GT → AP = 3/4 (precision 1 up to 0.75)
    assert r["ap50"] == pytest.approx(0.75)
    m.reset()
    assert math.isnan(m.compute()["detection"])


def test_average_precision_hand_cases():
    # TP, FP, TP with 2 GT: precision 1 at recall ½, 2/3 at recall 1 → ½ + ⅓
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), 2) == pytest.approx(0.5 + 1 / 3)
    # a missed GT caps recall at 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), 3) == pytest.approx(
        (1 + 2 / 3) / 3
    )
    # interpolation: a later higher precision lifts earlier recall steps (FP, TP, TP with 2 GT)
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1]), 2) == pytest.approx(2 / 3)
    # order is by score, not by input position
    assert average_precision(np.array([0.1, 0.9]), np.array([1, 0]), 1) == pytest.approx(0.5)
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0), 0))


def test_detection_metrics_shape_errors():
    m = DetectionMetrics()
    with pytest.raises(ValueError, match="pred_labels"):
        m.update(
            torch.zeros(1, 2, 4),
            torch.zeros(1, 3),
            torch.zeros(1, 2),
            torch.zeros(1, 1, 4),
            torch.zeros(1, 1),
        )


def test_reconstruction_rmse():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert reconstruction_rmse(a, b).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="must match"):
        reconstruction_rmse(a, b[:, :, :1])
