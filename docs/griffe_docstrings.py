"""Griffe extension for the API reference (``mkdocs.yml``): read needlework's docstrings as written.

* ``Example:`` (the Google style guide's singular) becomes an examples section, so ``>>>`` lines render
  as code — griffe knows only ``Examples:``.
* Sphinx roles (``:func:`name```, ``:class:`~a.B```) become inline code (``name``, ``B``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class NeedleworkDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        obj.docstring.value = _ROLE.sub(_role, _EXAMPLE.sub(r"\1Examples:", obj.docstring.value))
