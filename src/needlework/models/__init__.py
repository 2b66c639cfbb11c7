"""Models. Importing this package registers every built-in model (one import line per module)."""

import needlework.mist  # noqa: F401  (registers "mist", "mist.channelwise", "mist.grid")
from needlework.models.base import NeedleworkModel, route_batch

__all__ = ["NeedleworkModel", "route_batch"]
