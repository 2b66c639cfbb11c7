"""Models. Importing this package registers every built-in model (one import line per module)."""

from needlework.models import mil  # noqa: F401  (registers the MIL zoo)
from needlework.models.base import NeedleworkModel, route_batch

__all__ = ["NeedleworkModel", "route_batch"]
