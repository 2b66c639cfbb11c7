"""The local-checkpoint registry: a JSON file ``{encoder name: weights path}`` named by
``$NEEDLEWORK_LOCAL_CKPTS`` (TRIDENT's ``local_ckpts.json`` idea), for offline users.

Kept free of torch so that ``needlework doctor`` can list the registry without loading the models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCAL_CKPTS_ENV = "NEEDLEWORK_LOCAL_CKPTS"


def local_checkpoints(path: str | Path | None = None) -> dict[str, str]:
    """The local-checkpoint registry ``{encoder name: weights path}`` (from ``path`` or
    ``$NEEDLEWORK_LOCAL_CKPTS``); relative paths are relative to the registry file."""
    path = path or os.environ.get(LOCAL_CKPTS_ENV)
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"local checkpoint registry not found: {path} (set by {LOCAL_CKPTS_ENV})")
    data = json.loads(path.read_text())
    base = path.parent
    return {k: str((base / v) if not Path(v).is_absolute() else Path(v)) for k, v in data.items()}
