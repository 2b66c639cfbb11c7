"""Models. Importing this package registers every built-in model (one import line per module)."""

from needlework.models import (
    encoders,  # noqa: F401  (registers the built-in tile encoders)
    mil,  # noqa: F401  (registers the MIL zoo)
    selection_presets,  # noqa: F401  (registers dps/ips presets)
)
from needlework.models.ats import ATSClassifier, AttentionSampling
from needlework.models.ats_multilevel import MultiResolutionAttentionSampling
from needlework.models.bagnet import BagNetEncoder, DenseClassifier, receptive_field
from needlework.models.base import NeedleworkModel, route_batch
from needlework.models.dps import DPS
from needlework.models.ips import IPS
from needlework.models.megapixel_mnist import AttentionMILClassifier, DenseCNNClassifier
from needlework.models.pooling import AttentionPool, create_pooling, flatten_map

__all__ = [
    "DPS",
    "IPS",
    "ATSClassifier",
    "AttentionMILClassifier",
    "AttentionPool",
    "AttentionSampling",
    "BagNetEncoder",
    "DenseCNNClassifier",
    "DenseClassifier",
    "MultiResolutionAttentionSampling",
    "NeedleworkModel",
    "create_pooling",
    "flatten_map",
    "receptive_field",
    "route_batch",
]

import needlework.mist  # noqa: F401  (registers "mist", "mist.channelwise", "mist.grid")
