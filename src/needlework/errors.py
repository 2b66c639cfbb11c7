"""Errors the user fixes (a wrong path, a CSV without a column, an unknown encoder): the CLI prints them
as one ``error: <message>`` line, without a traceback, and exits with status 2.

They subclass the built-in type they replace (``FileNotFoundError``, ``ValueError``, ``KeyError``), so
code that caught those still catches them. A leaf module: it imports nothing from needlework.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration, reported once, before any work is done; the message says what to do."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ConfigError(UserError, ValueError):
    """An option or an input file's content is wrong (a missing CSV column, an unknown encoder)."""

    def __str__(self) -> str:  # a KeyError-style repr would quote the message
        return str(self.args[0]) if self.args else ""


__all__ = ["ConfigError", "InputNotFoundError", "UserError"]
