"""Classification metrics (torchmetrics) shared by every task.

Single-label: accuracy, balanced accuracy (macro recall), AUROC (one-vs-rest, macro), F1 (binary F1 of
class 1 for two classes, weighted F1 otherwise). Multi-label: per-label accuracy, macro AUROC, macro F1.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)


def classification_metrics(num_classes: int, multilabel: bool = False) -> MetricCollection:
    """A metric collection updated with ``(probabilities, targets)``."""
    if multilabel:
        return MetricCollection({
            "acc": MultilabelAccuracy(num_labels=num_classes),
            "auroc": MultilabelAUROC(num_labels=num_classes),
            "f1": MultilabelF1Score(num_labels=num_classes, average="macro"),
        })
    metrics = {
        "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "bacc": MulticlassAccuracy(num_classes=num_classes, average="macro"),
        "auroc": MulticlassAUROC(num_classes=num_classes),
    }
    if num_classes == 2:
        metrics["f1"] = PositiveClassF1()
    else:
        metrics["f1"] = MulticlassF1Score(num_classes=num_classes, average="weighted")
    return MetricCollection(metrics)


class PositiveClassF1(BinaryF1Score):
    """Binary F1 of class 1, updated with ``(B, 2)`` class probabilities."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(preds[:, 1], target)
