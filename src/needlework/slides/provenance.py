"""Provenance stamped on every artefact: library version, code hash and config hash (STAMP's idea)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """First 12 hex digits of a SHA-256 over the needlework package's ``.py`` sources (sorted)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def config_hash(config: Any) -> str:
    """First 12 hex digits of a SHA-256 of ``config`` as canonical JSON."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def library_version() -> str:
    from needlework._version import __version__

    return __version__


def stamp(config: Any) -> dict[str, str]:
    """The provenance attributes for an artefact produced under ``config``."""
    return {
        "library_version": library_version(),
        "code_hash": code_hash(),
        "config_hash": config_hash(config),
    }
