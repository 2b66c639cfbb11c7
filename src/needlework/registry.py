"""One registry per kind of thing (models, encoders, ...), timm-style.

A model is registered by decorating a factory (a function or a class) with ``@register_model``;
``create_model(name, **kwargs)`` builds it and ``list_models(pattern)`` lists the names. Names use
dots for variants (``"bagnet.rf33"``, ``"abmil.gated"``).

This module is a leaf: it imports nothing of needlework. Built-ins register themselves when their
package is imported (``needlework.models``, ``needlework.data``; the top-level ``needlework.create_model``
imports both first). Third-party packages plug in through entry points, loaded on the first look-up
of a name that is not registered::

    [project.entry-points."needlework.models"]
    my_model = "my_package.models:MyModel"     # a factory: registered under the entry point's name
    my_family = "my_package.models"            # a module: importing it runs its @register_model lines

Groups: ``needlework.models``, ``needlework.encoders``, ``needlework.datasets``, ``needlework.collates``,
``needlework.transforms``.

Example:
    >>> import needlework
    >>> "bagnet" in needlework.list_models()
    True
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A name → factory mapping with helpful errors, and entry points of group ``needlework.<kind>s``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.group = f"needlework.{kind}s"
        self._factories: dict[str, Callable[..., Any]] = {}
        self._plugins_loaded = False

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name`` (default: its ``__name__``)."""

        def decorator(factory: F) -> F:
            key = name or factory.__name__
            if key in self._factories and self._factories[key] is not factory:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = factory
            return factory

        return decorator

    def load_plugins(self) -> None:
        """Load the entry points of group ``needlework.<kind>s`` (once; a broken plug-in is named)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as err:  # a broken plug-in must not hide the built-ins
                raise ImportError(
                    f"the {self.group} entry point {ep.name!r} ({ep.value}) failed to import: {err}. "
                    "Fix or uninstall the package that provides it."
                ) from err
            if not inspect.ismodule(obj) and callable(obj) and ep.name not in self._factories:
                self._factories[ep.name] = obj

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            self.load_plugins()
        try:
            return self._factories[name]
        except KeyError:
            close = [n for n in self._factories if name.split(".")[0] in n][:8]
            hint = f" Did you mean one of {close}?" if close else ""
            raise KeyError(
                f"Unknown {self.kind} {name!r}.{hint} See needlework.list_{self.kind}s() for all names "
                f"(a plug-in registers through the {self.group!r} entry points)."
            ) from None

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        self.load_plugins()
        return sorted(n for n in self._factories if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        if name not in self._factories:
            self.load_plugins()
        return name in self._factories


MODELS = Registry("model")
ENCODERS = Registry("encoder")
DATASETS = Registry("dataset")
COLLATES = Registry("collate")
TRANSFORMS = Registry("transform")

register_model = MODELS.register
register_encoder = ENCODERS.register
register_dataset = DATASETS.register
register_collate = COLLATES.register
register_transform = TRANSFORMS.register


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


def get_collate(name: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The DataLoader ``collate_fn`` registered under ``name`` (``"default"``, ``"pad_bags"``, ...)."""
    try:
        return COLLATES.get(name)
    except KeyError:
        raise ValueError(f"unknown collate {name!r}; choose one of {COLLATES.names()}") from None


def create_transform(spec: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A sample transform from ``{"name": <registered name>, **kwargs}`` (e.g. ``{"name": "views"}``)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            "a transform is a mapping with a 'name' and its arguments, e.g. {'name': 'views', 'factor': 8}; "
            f"got {spec!r} (registered: {TRANSFORMS.names()})"
        )
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return TRANSFORMS.create(spec["name"], **kwargs)
