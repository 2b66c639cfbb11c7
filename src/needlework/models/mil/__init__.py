"""The MIL model zoo: every model maps ``bag (B, N, D)``, ``coords (B, N, 2) | None``, ``mask (B, N) | None``
to a dict with ``logits (B, C)`` and ``attention``. Importing this package registers all of them."""

from needlework.models.mil import (  # noqa: F401  (registration)
    abmil,
    clam,
    dsmil,
    pixel_bags,
    pooling_mil,
    sparseconvmil,
    transmil,
    zoommil,
)
from needlework.models.mil.abmil import ABMIL
from needlework.models.mil.clam import CLAMSB
from needlework.models.mil.common import MILModel, check_bag, list_mil_models, masked_softmax
from needlework.models.mil.dsmil import DSMIL
from needlework.models.mil.pixel_bags import LeNetEncoder, PixelBagMIL
from needlework.models.mil.pooling_mil import EmbeddingPoolingMIL, InstancePoolingMIL
from needlework.models.mil.sparseconvmil import SparseConvMIL
from needlework.models.mil.transmil import TransMIL
from needlework.models.mil.zoommil import ZoomMIL

__all__ = [
    "ABMIL",
    "CLAMSB",
    "DSMIL",
    "EmbeddingPoolingMIL",
    "InstancePoolingMIL",
    "LeNetEncoder",
    "MILModel",
    "PixelBagMIL",
    "SparseConvMIL",
    "TransMIL",
    "ZoomMIL",
    "check_bag",
    "list_mil_models",
    "masked_softmax",
]
