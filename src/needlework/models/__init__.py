"""Models. Importing this package registers every built-in model (one import line per family, as in timm).

One contract for every model (``models/base.py``): ``forward(**batch)`` returns a dict with ``logits`` and,
where the method has one, ``attention``. Families, one file each: ``bagnet`` (the dense testbed CNN),
``ats`` (attention sampling), ``dps`` and ``ips`` (differentiable / iterative top-K patch selection),
``dense_cnn`` and ``attention_mil`` (the Megapixel-MNIST baselines), ``mist`` (MIST and its baselines),
``patch_mil`` (MIL over every grid patch), ``encoders`` (tile encoders), ``mil/`` (the MIL zoo).
"""

from needlework.models import (  # noqa: F401  (each import registers its models)
    ats,
    attention_mil,
    bagnet,
    dense_cnn,
    dps,
    encoders,
    ips,
    mil,
    mist,
    mist_baselines,
    patch_mil,
)
from needlework.models.ats import ATSClassifier, AttentionSampling
from needlework.models.ats_multilevel import MultiResolutionAttentionSampling
from needlework.models.attention_mil import AttentionMILClassifier
from needlework.models.bagnet import BagNetEncoder, DenseClassifier, receptive_field
from needlework.models.base import NeedleworkModel, route_batch
from needlework.models.dense_cnn import DenseCNNClassifier
from needlework.models.dps import DPS
from needlework.models.ips import IPS
from needlework.models.mist import MIST, PatchTaskModel
from needlework.models.mist_baselines import ChannelwiseMIST, GridMIST
from needlework.models.patch_mil import PatchGridMIL
from needlework.models.pooling import AttentionPool, create_pooling, flatten_map

__all__ = [
    "DPS",
    "IPS",
    "MIST",
    "ATSClassifier",
    "AttentionMILClassifier",
    "AttentionPool",
    "AttentionSampling",
    "BagNetEncoder",
    "ChannelwiseMIST",
    "DenseCNNClassifier",
    "DenseClassifier",
    "GridMIST",
    "MultiResolutionAttentionSampling",
    "NeedleworkModel",
    "PatchGridMIL",
    "PatchTaskModel",
    "create_pooling",
    "flatten_map",
    "receptive_field",
    "route_batch",
]
