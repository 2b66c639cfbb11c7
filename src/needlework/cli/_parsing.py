"""One option style for the non-training commands, generated from the job dataclasses and signatures.

The options are jsonargparse's, the style LightningCLI uses for ``needlework fit``: names as in the
Python API with underscores (``--job_dir``, ``--mpp_csv``), fields of a nested dataclass dotted
(``--tiling.patch_size 256``, ``--tissue.seg_mpp 2``), booleans ``true``/``false`` (a bare ``--name``
means ``true``), lists and tuples as YAML (``--lesion_radius '[40, 80]'``). Every command takes
``--config file.yaml`` (options as YAML; later flags override it) and ``--print_config`` (the resolved
options as YAML, to start a config file), and ``--help`` shows every default.

Each command builds only its own parser, from its own modules, so ``slides tile`` never imports the
embedding job (torch) and ``doctor`` never imports the models.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

T = TypeVar("T")

STYLE = (
    "Options: --name value, nested --group.name value; booleans true|false (bare --name = true); "
    "lists as YAML ('[a, b]'). --config FILE.yaml takes them all; --print_config writes one."
)


class _Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults and types after each option; the description as written."""


def new_parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog, description=description, epilog=STYLE, formatter_class=_Formatter, exit_on_error=True
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file of options (later flags override it)"
    )
    return parser


def add_group(title: str, add: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``add(*args, **kwargs)`` (``parser.add_function_arguments`` / ``add_class_arguments``) with the
    first option group it creates titled ``title`` (jsonargparse uses the docstring's first line)."""
    parser = add.__self__  # type: ignore[attr-defined]
    n = len(parser._action_groups)
    add(*args, **kwargs)
    if len(parser._action_groups) > n:
        parser._action_groups[n].title = title


def _bool_options(parser: ArgumentParser) -> set[str]:
    opts: set[str] = set()
    for action in parser._actions:
        if getattr(action, "_typehint", None) is bool or action.type is bool:
            opts.update(s for s in action.option_strings if s.startswith("--"))
    return opts


def with_bare_booleans(parser: ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--skip_errors`` → ``--skip_errors true`` for boolean options given without a value."""
    flags = _bool_options(parser)
    out: list[str] = []
    argv = list(argv)
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (nxt is None or nxt.startswith("-")):
            out.append("true")
    return out


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """Parse ``argv`` (usage errors exit with status 2 and an ``error: ...`` line, as argparse does)."""
    return parser.parse_args(with_bare_booleans(parser, argv))


def instantiate(parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """Build the nested dataclasses of ``cfg``; an invalid value is a usage error (status 2)."""
    try:
        return parser.instantiate(cfg)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: error() exits


def build(parser: ArgumentParser, cls: type[T], cfg: Namespace) -> T:
    """``cls(**fields)`` from the top-level options of an instantiated ``cfg`` (a job dataclass whose
    fields are the command's options); an invalid value is a usage error (status 2)."""
    try:
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise


def _warning_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Warnings printed as ``warning: <message>`` (no source line) while a command runs."""
    old = warnings.formatwarning
    warnings.formatwarning = _warning_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = old


def run_reporting_errors(
    fn: Callable[[], int],
    errors: tuple[type[BaseException], ...],
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a command; the expected failures print ``error: <message>`` without a traceback.

    ``failures`` (work that failed, e.g. a slide that could not be read) return status 1; ``errors``
    and :class:`~needlework.errors.UserError` (bad input the user fixes: a wrong path, a CSV without a
    column, an unknown encoder) return status 2, as a usage error does.
    """
    from needlework.errors import UserError

    with plain_warnings():
        try:
            return int(fn() or 0)
        except failures as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (UserError, *errors) as exc:
            print(f"error: {_message(exc)}", file=sys.stderr)
            return 2


def _message(exc: BaseException) -> str:
    # str(KeyError("x")) is "'x'": print the message itself
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)
