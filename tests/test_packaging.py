"""The packaged configs and ``py.typed`` ship with the package: found through importlib.resources, and
inside a freshly built wheel (slow: builds one)."""

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from needlework.configs import CONFIG_DIR, list_configs, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "needlework"


def source_configs() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in (PKG / "configs").rglob("*.yaml")}


def resource_files(node, prefix: str = "") -> set[str]:
    out = set()
    for child in node.iterdir():
        name = f"{prefix}{child.name}"
        if child.is_dir():
            out |= resource_files(child, f"{name}/")
        elif name.endswith(".yaml"):
            out.add(name)
    return out


def test_configs_are_package_resources():
    root = resources.files("needlework")
    assert root.joinpath("py.typed").is_file()
    found = resource_files(root.joinpath("configs"), "configs/")
    assert "configs/needle_mnist/dense.yaml" in found
    assert "configs/mil/slides/zoommil.yaml" in found  # nested families too
    assert found == source_configs()
    # list_configs names exactly the packaged resources
    assert {f"configs/{n}.yaml" for n in list_configs()} == found


def test_packaged_config_resolves_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ symlink here: only the package can answer
    for name in ("needle_mnist/dense", "needle_mnist/dense.yaml", "configs/needle_mnist/dense.yaml"):
        path = resolve_config(name)
        assert path == CONFIG_DIR / "needle_mnist" / "dense.yaml"
        assert path.read_text() == resources.files("needlework").joinpath(
            "configs/needle_mnist/dense.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="dense"):
        resolve_config("needle_mnist/dense_typo")


@pytest.mark.slow
def test_wheel_contains_configs_and_py_typed(tmp_path):
    # build from a copy so that build/ and *.egg-info never land in the working tree
    src = tmp_path / "src_tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(PKG, src / "src" / "needlework", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    cmd.append(".")
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("needlework-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "needlework/py.typed" in names
    in_wheel = {n.removeprefix("needlework/") for n in names if n.startswith("needlework/configs/")}
    assert {n for n in in_wheel if n.endswith(".yaml")} == source_configs()
    # every module of the source tree is in the wheel (io/ and viz/ included)
    modules = {p.relative_to(PKG.parent).as_posix() for p in PKG.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "needlework = needlework.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
