"""Model arguments on the training command line: nested overrides that merge, checked at parse time.

``model_kwargs`` is a plain dict to jsonargparse (the model is chosen by registry name, so its arguments
are not known when the parser is built), and jsonargparse replaces a nested dict wholesale:
``--model.init_args.model_kwargs.mil_kwargs.heads 2`` would drop the config's other ``mil_kwargs``.
Here such flags are taken out of the command line before parsing and merged into the parsed
``model_kwargs`` key by key (:func:`merge_overrides`); then every key is checked against the model
factory's signature, and ``<name>_kwargs`` next to a ``<name>`` that names a registered model (the
MIL head of ``lenet_mil``, ``patch_mil``) against that model's (:func:`check_model_kwargs`).
:func:`model_arguments` fills in the defaults, which ``--print_config`` shows.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

PREFIXES = ("--model.init_args.model_kwargs.", "--model.model_kwargs.")
# arguments the task (top level) or the enclosing model (a nested head) sets itself
SET_BY_TASK = frozenset({"num_classes"})
SET_BY_PARENT = frozenset({"num_classes", "in_dim"})


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[list[str], Any]]]:
    """``argv`` without the nested ``model_kwargs`` flags, and those flags as ``(key path, value)``.

    ``--model.init_args.model_kwargs.mil_kwargs.heads 2`` → ``(["mil_kwargs", "heads"], 2)``; values
    are read as YAML (``2`` → int, ``'[1, 2]'`` → list, ``null`` → None), as jsonargparse reads them.
    """
    rest: list[str] = []
    overrides: list[tuple[list[str], Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        prefix = next((p for p in PREFIXES if arg.startswith(p)), None)
        if prefix is None:
            rest.append(arg)
            i += 1
            continue
        key, eq, value = arg[len(prefix) :].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        path = key.split(".")
        if not all(path):
            raise ValueError(f"{arg}: empty key in the model argument path")
        try:
            overrides.append((path, yaml.safe_load(value)))
        except yaml.YAMLError as err:
            raise ValueError(f"{arg}: value {value!r} is not valid YAML ({err})") from None
    return rest, overrides


def merge_overrides(kwargs: dict[str, Any] | None, overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A copy of ``kwargs`` with every override set at its key path; sibling keys are kept."""
    import copy

    out = copy.deepcopy(dict(kwargs or {}))
    for path, value in overrides:
        node = out
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return out


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """The arguments ``factory`` takes; a factory forwarding ``**kwargs`` to the class it returns
    (``def transmil(in_dim, num_classes=2, **kwargs) -> TransMIL``) takes that class's too."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to check against
        return None
    params = dict(sig.parameters)
    var_kw = [n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if not var_kw or inspect.isclass(factory):
        return sig
    try:
        returns = typing.get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: keep the factory's own signature
        returns = None
    if not inspect.isclass(returns) or returns is factory:
        return sig
    inner = _signature(returns)
    if inner is None:
        return sig
    del params[var_kw[0]]
    for name, p in inner.parameters.items():
        if name not in params and p.kind is not inspect.Parameter.VAR_POSITIONAL:
            keyword = p.kind is p.VAR_KEYWORD
            params[name] = p if keyword else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    ordered = sorted(params.values(), key=lambda p: p.kind)  # a Signature needs kinds in order
    return sig.replace(parameters=ordered)


def _nested_models(sig: inspect.Signature, kwargs: dict[str, Any]) -> dict[str, str]:
    """``{"<name>_kwargs": model name}`` for each ``<name>`` argument naming a registered model."""
    from needlework.registry import MODELS

    out = {}
    for key in sig.parameters:
        if not key.endswith("_kwargs"):
            continue
        owner = key[: -len("_kwargs")]
        name = kwargs.get(owner, sig.parameters[owner].default if owner in sig.parameters else None)
        if isinstance(name, str) and name in MODELS:
            out[key] = name
    return out


def check_model_kwargs(
    model: str,
    kwargs: dict[str, Any] | None,
    where: str = "model_kwargs",
    reserved: frozenset[str] = SET_BY_TASK,
) -> None:
    """Raise ``ValueError`` naming the first argument of ``kwargs`` that model ``model`` does not take
    (or one in ``reserved``, which the task or the enclosing model sets)."""
    from needlework.registry import MODELS

    kwargs = kwargs or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where} must be a mapping of argument names to values, got {kwargs!r}")
    sig = _signature(MODELS.get(model))
    if sig is None:
        return
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in kwargs:
        if key in reserved:
            setter = (
                "the task (--model.init_args.num_classes)" if key == "num_classes" else "the enclosing model"
            )
            raise ValueError(f"{where}.{key} is set by {setter}; remove it from {where}")
        if key not in params and not takes_any:
            allowed = ", ".join(n for n in named if n not in reserved)
            raise ValueError(
                f"{where}: model {model!r} has no argument {key!r}; its arguments are: {allowed} "
                f"(see `needlework fit ... --print_config` for their defaults)"
            )
    for key, nested in _nested_models(sig, kwargs).items():
        check_model_kwargs(nested, kwargs.get(key), f"{where}.{key}", SET_BY_PARENT)


def _plain(value: Any) -> bool:
    """A default that YAML shows and reads back as itself."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def model_arguments(
    model: str, kwargs: dict[str, Any] | None, reserved: frozenset[str] = SET_BY_TASK
) -> dict[str, Any]:
    """``kwargs`` with every other argument of the model (and of its nested models) at its default.

    Arguments set by the task or the parent model (``num_classes``, ``in_dim`` of a head) and defaults
    YAML cannot show (objects, functions) are left out.
    """
    from needlework.registry import MODELS

    kwargs = dict(kwargs or {})
    sig = _signature(MODELS.get(model))
    if sig is None:
        return kwargs
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if name in kwargs:
            out[name] = kwargs[name]
        elif p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in reserved:
            continue
        elif p.default is not inspect.Parameter.empty and _plain(p.default):
            out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    for key, nested in _nested_models(sig, out).items():
        out[key] = model_arguments(nested, out.get(key), SET_BY_PARENT)
    out.update({k: v for k, v in kwargs.items() if k not in out})  # **kwargs of the factory
    return out
