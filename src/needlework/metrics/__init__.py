"""Evaluation metrics beyond classification (localisation, detection, attention summaries)."""

from needlework.metrics.attention import (
    attention_entropy,
    js_distance,
    object_mass,
    pool_attention,
    total_variation,
)
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
    "attention_entropy",
    "attention_peaks",
    "average_precision",
    "box_iou",
    "js_distance",
    "localisation_ap",
    "localisation_hits",
    "match_detections",
    "object_mass",
    "point_in_boxes",
    "pool_attention",
    "reconstruction_rmse",
    "total_variation",
]
