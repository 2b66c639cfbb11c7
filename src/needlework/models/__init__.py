"""Models. Importing this package registers every built-in model (one import line per module)."""

from needlework.models.ats import ATSClassifier, AttentionSampling
from needlework.models.base import NeedleworkModel, route_batch
from needlework.models.megapixel_mnist import AttentionMILClassifier, DenseClassifier

__all__ = [
    "ATSClassifier",
    "AttentionMILClassifier",
    "AttentionSampling",
    "DenseClassifier",
    "NeedleworkModel",
    "route_batch",
]
