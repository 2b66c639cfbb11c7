"""Evaluation metrics beyond classification (localisation, detection)."""

from needlework.metrics.detection import (
    DetectionMetrics,
    average_precision,
    box_iou,
    match_detections,
    reconstruction_rmse,
)
from needlework.metrics.localisation import (
    attention_peaks,
    localisation_ap,
    localisation_hits,
    point_in_boxes,
)

__all__ = [
    "DetectionMetrics",
    "attention_peaks",
    "average_precision",
    "box_iou",
    "localisation_ap",
    "localisation_hits",
    "match_detections",
    "point_in_boxes",
    "reconstruction_rmse",
]
