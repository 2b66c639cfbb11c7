"""Evaluation metrics beyond classification (localisation, detection)."""

from needlework.metrics.localisation import localisation_ap, localisation_hits, point_in_boxes

__all__ = ["localisation_ap", "localisation_hits", "point_in_boxes"]
