"""The README's "Package layout" file map matches ``src/needlework`` at its first two levels: every path in
the map exists, and every file and folder of the package at those levels is in the map."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "needlework"
LINE = re.compile(r"^(?P<indent>(?:│   |    )*)(?:├── |└── )(?P<name>\S+)(?P<desc>.*)$")


def readme_map() -> list[tuple[str, str]]:
    """``(path relative to src/needlework, description)`` for each line of the map; folders end in ``/``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Package layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert block[0] == "src/needlework/", block[0]
    entries, folder = [], None
    for line in block[1:]:
        m = LINE.match(line)
        assert m, f"not a line of the tree: {line!r}"
        depth = len(m["indent"]) // 4
        name = m["name"]
        if depth == 0:
            folder = name if name.endswith("/") else None
            entries.append((name, m["desc"].strip()))
        else:
            assert depth == 1 and folder, f"{name!r} sits under no folder of the first level"
            entries.append((folder + name, m["desc"].strip()))
    return entries


def package_tree() -> set[str]:
    """Files and folders of the package at the first two levels (``__init__.py`` of sub-packages and
    caches left out: the folder's line stands for its ``__init__``)."""
    def listed(folder: Path):
        return [p for p in folder.iterdir() if p.name != "__pycache__" and p.suffix != ".pyc"]

    out = set()
    for p in listed(PKG):
        if p.is_dir():
            out.add(f"{p.name}/")
            out |= {f"{p.name}/{c.name}" + ("/" if c.is_dir() else "") for c in listed(p)
                    if c.name != "__init__.py"}
        else:
            out.add(p.name)
    return out


def test_map_parses_and_has_descriptions():
    entries = readme_map()
    assert ("ats/expectation.py" in dict(entries)) and ("models/mil/" in dict(entries))
    assert [e for e, desc in entries if not desc] == [], "every line says what the file holds"
    names = [e for e, _ in entries]
    assert len(names) == len(set(names)), "a path appears twice"


def test_every_path_in_the_map_exists():
    missing = []
    for rel, _ in readme_map():
        path = PKG / rel.rstrip("/")
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            missing.append(rel)
    assert not missing, f"in the README map but not in src/needlework: {missing}"


def test_every_module_and_package_is_in_the_map():
    mapped = {rel for rel, _ in readme_map()}
    absent = sorted(package_tree() - mapped)
    assert not absent, f"in src/needlework but not in the README's package layout: {absent}"


def test_every_python_module_counts():
    # the tree walk sees what an import sees: modules, sub-packages, the packaged configs
    tree = package_tree()
    assert {"registry.py", "io/", "io/h5.py", "models/mil/", "configs/needle_mnist/", "py.typed"} <= tree
    assert "models/mil/abmil.py" not in tree and "ats/__init__.py" not in tree
