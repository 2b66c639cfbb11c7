"""Models. Importing this package registers every built-in model (one import line per module)."""

from needlework.models import selection_presets  # noqa: F401  (registers dps/ips presets)
from needlework.models.base import NeedleworkModel, route_batch
from needlework.models.dps import DPS
from needlework.models.ips import IPS

__all__ = ["DPS", "IPS", "NeedleworkModel", "route_batch"]
