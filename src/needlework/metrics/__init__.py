"""Evaluation metrics."""

from needlework.metrics.detection import (
    DetectionMetrics,
    average_precision,
    box_iou,
    match_detections,
    reconstruction_rmse,
)

__all__ = [
    "DetectionMetrics",
    "average_precision",
    "box_iou",
    "match_detections",
    "reconstruction_rmse",
]
