"""PEP 562 lazy attributes for package ``__init__`` files: names resolve to their module on first use.

Keeps ``import needlework.<pkg>`` cheap (no torch, lightning or h5py until a name that needs them is used)
and lets moved names keep working for one release with a ``DeprecationWarning`` naming the new home.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def lazy_module_getattr(
    package: str, exports: dict[str, str], moved: dict[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module defining it;
    ``moved`` maps deprecated names to their new module (a ``DeprecationWarning`` on each use)."""
    moved = moved or {}

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if name in moved:
            warnings.warn(
                f"{package}.{name} moved to {moved[name]}.{name}; the old name goes in the next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
