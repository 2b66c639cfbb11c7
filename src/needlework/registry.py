"""One registry per kind of thing (models, encoders, ...), timm-style.

A model is registered by decorating a factory (a function or a class) with ``@register_model``;
``create_model(name, **kwargs)`` builds it and ``list_models(pattern)`` lists the names. Names use
dots for variants (``"bagnet.rf33"``, ``"abmil.gated"``).

Example:
    >>> import needlework
    >>> "bagnet" in needlework.list_models()
    True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A name → factory mapping with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name`` (default: its ``__name__``)."""

        def decorator(factory: F) -> F:
            key = name or factory.__name__
            if key in self._factories and self._factories[key] is not factory:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        _load_builtin_modules()
        try:
            return self._factories[name]
        except KeyError:
            close = [n for n in self._factories if name.split(".")[0] in n][:8]
            hint = f" Did you mean one of {close}?" if close else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r}.{hint} See needlework.list_{self.kind}s() for all names."
            ) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        _load_builtin_modules()
        return sorted(n for n in self._factories if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        _load_builtin_modules()
        return name in self._factories


MODELS = Registry("model")
ENCODERS = Registry("encoder")
DATASETS = Registry("dataset")

register_model = MODELS.register
register_encoder = ENCODERS.register
register_dataset = DATASETS.register

_loaded = False


def _load_builtin_modules() -> None:
    """Import the modules that register built-in factories (lazily, to keep imports cheap)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import needlework.data
    import needlework.models  # noqa: F401  (registers models and encoders)


def create_model(name: str, **kwargs: Any) -> Any:
    """Build the registered model ``name`` with ``kwargs`` (see :func:`list_models`)."""
    return MODELS.create(name, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Names of all registered models matching the glob ``pattern``."""
    return MODELS.names(pattern)


def create_encoder(name: str, **kwargs: Any) -> Any:
    """Build the registered tile/patch encoder ``name``."""
    return ENCODERS.create(name, **kwargs)


def list_encoders(pattern: str = "*") -> list[str]:
    """Names of all registered encoders matching ``pattern``."""
    return ENCODERS.names(pattern)


def create_dataset(name: str, **kwargs: Any) -> Any:
    """Build the registered dataset ``name`` (every dataset takes ``split=``)."""
    return DATASETS.create(name, **kwargs)


def list_datasets(pattern: str = "*") -> list[str]:
    """Names of all registered datasets matching ``pattern``."""
    return DATASETS.names(pattern)
