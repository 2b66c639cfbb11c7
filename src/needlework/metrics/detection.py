"""Detection metrics for multi-instance detection without location labels (MIST, METHODS.md §8.3).

* **detection** — fraction of ground-truth objects matched by a prediction with IoU ≥ ``iou_threshold``
  under a one-to-one Hungarian matching (``scipy.optimize.linear_sum_assignment`` maximising the summed IoU
  of admissible pairs);
* **classification** — fraction of matched objects whose predicted label is right;
* **both** — fraction of ground-truth objects detected *and* correctly classified;
* **AP@0.5** — area under the all-point-interpolated precision/recall curve (VOC style: predictions of all
  images ranked by score, each greedily matched to the unmatched ground truth of highest IoU);
* **reconstruction RMSE** — per-image root-mean-square error.

Boxes are ``xyxy`` pixels. Ground-truth rows labelled −1 are padding and ignored.

Example:
    >>> gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    >>> pred = torch.tensor([[21.0, 21, 31, 31], [50, 50, 60, 60]])
    >>> match_detections(pred, gt)
    (array([0]), array([1]))
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from needlework.checks import check_shape


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of ``xyxy`` boxes ``a (N, 4)`` and ``b (M, 4)`` (0 for empty unions)."""
    check_shape(a, ["N", "4"], "a")
    check_shape(b, ["M", "4"], "b")
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def match_detections(
    pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predictions to ground truth with IoU ≥ ``iou_threshold``.

    Hungarian assignment maximising the summed IoU over admissible pairs (pairs below the threshold
    count as 0 and are dropped afterwards).

    Returns:
        ``(pred_idx, gt_idx)`` int arrays of the matched pairs, sorted by ``gt_idx``.
    """
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    iou = box_iou(pred_boxes.detach().double().cpu(), gt_boxes.detach().double().cpu()).numpy()
    score = np.where(iou >= iou_threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(score, maximize=True)
    keep = score[rows, cols] > 0
    order = np.argsort(cols[keep])
    return rows[keep][order].astype(np.int64), cols[keep][order].astype(np.int64)


def average_precision(scores: np.ndarray, is_true_positive: np.ndarray, n_ground_truth: int) -> float:
    """All-point interpolated AP from ranked detections (VOC 2010+ definition).

    Args:
        scores: ``(N,)`` detection scores of all images.
        is_true_positive: ``(N,)`` bool, whether each detection matched an unmatched ground truth.
        n_ground_truth: total number of ground-truth objects (0 → NaN).
    """
    if n_ground_truth <= 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_true_positive, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_ground_truth
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    # precision envelope (monotone non-increasing from the right), integrated over recall steps
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def greedy_true_positives(
    pred_boxes: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float = 0.5
) -> np.ndarray:
    """VOC matching of one image: in descending score order, each prediction takes the unmatched
    ground truth of highest IoU if that IoU ≥ threshold. Returns ``(N,)`` bool in the input order."""
    tp = np.zeros(len(pred_boxes), dtype=bool)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    iou = box_iou(pred_boxes.detach().double().cpu(), gt_boxes.detach().double().cpu()).numpy()
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for i in np.argsort(-scores.detach().double().cpu().numpy(), kind="stable"):
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_threshold:
            tp[i], taken[j] = True, True
    return tp


def reconstruction_rmse(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE ``(B,)`` between ``(B, C, H, W)`` tensors."""
    if reconstruction.shape != image.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and image {tuple(image.shape)} must match"
        )
    return (reconstruction - image).pow(2).flatten(1).mean(1).sqrt()


class DetectionMetrics:
    """Accumulates detection / classification / both / AP@0.5 over batches.

    Example:
        >>> m = DetectionMetrics()
        >>> gt = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30]]])
        >>> labels, scores = torch.tensor([[1, 5]]), torch.tensor([[0.9, 0.8]])
        >>> m.update(gt.clone(), labels, scores, gt, torch.tensor([[1, 2]]))
        >>> {k: round(v, 3) for k, v in m.compute().items() if k != "n_ground_truth"}
        {'detection': 1.0, 'classification': 0.5, 'both': 0.5, 'ap50': 1.0}
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = float(iou_threshold)
        self.reset()

    def reset(self) -> None:
        self.n_gt = self.n_matched = self.n_correct = 0
        self._scores: list[np.ndarray] = []
        self._tp: list[np.ndarray] = []

    def update(
        self,
        pred_boxes: torch.Tensor,
        pred_labels: torch.Tensor,
        pred_scores: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
    ) -> None:
        """Add a batch: ``pred_boxes (B, K, 4)``, ``pred_labels (B, K)``, ``pred_scores (B, K)``,
        ``gt_boxes (B, L, 4)``, ``gt_labels (B, L)`` (−1 = padding row)."""
        b, k = check_shape(pred_boxes, ["B", "K", "4"], "pred_boxes").values()
        check_shape(pred_labels, [str(b), str(k)], "pred_labels")
        check_shape(pred_scores, [str(b), str(k)], "pred_scores")
        check_shape(gt_boxes, [str(b), "L", "4"], "gt_boxes")
        check_shape(gt_labels, [str(b), str(gt_boxes.shape[1])], "gt_labels")
        for i in range(b):
            valid = gt_labels[i] >= 0
            gb, gl = gt_boxes[i][valid], gt_labels[i][valid]
            pi, gi = match_detections(pred_boxes[i], gb, self.iou_threshold)
            self.n_gt += len(gb)
            self.n_matched += len(pi)
            if len(pi):
                self.n_correct += int((pred_labels[i].cpu()[pi] == gl.cpu()[gi]).sum())
            self._scores.append(pred_scores[i].detach().double().cpu().numpy())
            self._tp.append(greedy_true_positives(pred_boxes[i], pred_scores[i], gb, self.iou_threshold))

    def state(self) -> dict[str, object]:
        """The accumulated counts and per-prediction arrays (picklable: gathered across processes)."""
        return {"n_gt": self.n_gt, "n_matched": self.n_matched, "n_correct": self.n_correct,
                "scores": list(self._scores), "tp": list(self._tp)}  # fmt: skip

    def merge(self, states: list[dict[str, object]]) -> None:
        """Replace the accumulated state by the union of ``states`` (e.g. every rank's :meth:`state`):
        :meth:`compute` then gives the metrics of all their images together."""
        self.reset()
        for st in states:
            self.n_gt += int(st["n_gt"])  # type: ignore[call-overload]
            self.n_matched += int(st["n_matched"])  # type: ignore[call-overload]
            self.n_correct += int(st["n_correct"])  # type: ignore[call-overload]
            self._scores += list(st["scores"])  # type: ignore[call-overload]
            self._tp += list(st["tp"])  # type: ignore[call-overload]

    def compute(self) -> dict[str, float]:
        """``detection``, ``classification``, ``both``, ``ap50`` (fractions; NaN when undefined)."""
        nan = float("nan")
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        tp = np.concatenate(self._tp) if self._tp else np.zeros(0, dtype=bool)
        return {
            "detection": self.n_matched / self.n_gt if self.n_gt else nan,
            "classification": self.n_correct / self.n_matched if self.n_matched else nan,
            "both": self.n_correct / self.n_gt if self.n_gt else nan,
            "ap50": average_precision(scores, tp, self.n_gt),
            "n_ground_truth": float(self.n_gt),
        }
