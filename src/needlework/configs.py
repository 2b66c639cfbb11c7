"""The YAML configs shipped inside the package (``needlework/configs/<family>/<name>.yaml``), found by name.

``needlework fit --config needle_mnist/dense`` (or ``needle_mnist/dense.yaml``) uses the packaged file when
no file of that name exists; ``needlework list configs`` lists them all.

Example:
    >>> "needle_mnist/dense" in list_configs()
    True
    >>> resolve_config("needle_mnist/dense").name
    'dense.yaml'
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_DIR", "list_configs", "resolve_config"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def list_configs(pattern: str = "*") -> list[str]:
    """Names (``family/name``, no suffix) of the packaged configs matching the glob ``pattern``."""
    import fnmatch

    names = (p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def resolve_config(name: str | Path) -> Path:
    """A config path: ``name`` itself when that file exists, else the packaged config of that name.

    Raises ``FileNotFoundError`` naming the packaged configs that come closest.
    """
    path = Path(name)
    if path.is_file():
        return path
    rel = path.as_posix().removeprefix("configs/")
    for candidate in (CONFIG_DIR / rel, CONFIG_DIR / f"{rel}.yaml"):
        if candidate.is_file():
            return candidate
    import difflib

    names = list_configs()
    stem = Path(rel).with_suffix("").as_posix()
    close = [n for n in names if Path(stem).name == Path(n).name] or difflib.get_close_matches(stem, names, 4)
    hint = f" Did you mean {close}?" if close else " See `needlework list configs`."
    raise FileNotFoundError(f"config {str(name)!r} is neither a file nor a packaged config.{hint}")
