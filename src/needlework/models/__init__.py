"""Models. Importing this package registers every built-in model (one import line per module)."""

from needlework.models import mil  # noqa: F401  (registers the MIL zoo)
from needlework.models.bagnet import BagNetEncoder, DenseClassifier, receptive_field
from needlework.models.base import NeedleworkModel, route_batch
from needlework.models.pooling import AttentionPool, create_pooling, flatten_map

__all__ = [
    "AttentionPool",
    "BagNetEncoder",
    "DenseClassifier",
    "NeedleworkModel",
    "create_pooling",
    "flatten_map",
    "receptive_field",
    "route_batch",
]
