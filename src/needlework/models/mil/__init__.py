"""The MIL model zoo: every model maps ``bag (B, N, D)``, ``coords (B, N, 2) | None``, ``mask (B, N) | None``
to a dict with ``logits (B, C)`` and ``attention``. Importing this package registers all of them."""

from needlework.models.mil import abmil, clam, dsmil, pooling, sparseconvmil, transmil  # noqa: F401
from needlework.models.mil.abmil import ABMIL
from needlework.models.mil.clam import CLAMSB
from needlework.models.mil.common import MILModel, check_bag, list_mil_models, masked_softmax
from needlework.models.mil.dsmil import DSMIL
from needlework.models.mil.pooling import EmbeddingPoolingMIL, InstancePoolingMIL
from needlework.models.mil.sparseconvmil import SparseConvMIL
from needlework.models.mil.transmil import TransMIL

__all__ = [
    "ABMIL",
    "CLAMSB",
    "DSMIL",
    "EmbeddingPoolingMIL",
    "InstancePoolingMIL",
    "MILModel",
    "SparseConvMIL",
    "TransMIL",
    "check_bag",
    "list_mil_models",
    "masked_softmax",
]
