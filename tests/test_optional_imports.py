"""Every module of needlework imports without its optional packages, so ``pytest --doctest-modules``
(``make test``) collects the whole package on an install without the extras.

The optional packages (ray, spconv, timm, openslide, tiffslide, safetensors) are blocked in a fresh
interpreter: ``import ray`` there raises ImportError, as on a machine without it. A module that needs one
must import it inside the function that uses it.
"""

import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "needlework"
OPTIONAL = ("ray", "spconv", "timm", "openslide", "tiffslide", "safetensors", "huggingface_hub")

CODE = """
import importlib, sys
for name in {optional!r}:
    sys.modules[name] = None  # import name -> ImportError
failed = []
for mod in {modules!r}:
    try:
        importlib.import_module(mod)
    except Exception as err:
        failed.append(f"{{mod}}: {{type(err).__name__}}: {{err}}")
print("\\n".join(failed))
"""


def package_modules() -> list[str]:
    mods = []
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the command line on import
        if parts[-1] == "__init__":
            parts.pop()
        mods.append(".".join(parts))
    return mods


def test_every_module_imports_without_optional_packages():
    modules = package_modules()
    assert "needlework.slides.ray_runner" in modules and "needlework.ops.spconv_backend" in modules
    code = CODE.format(optional=OPTIONAL, modules=modules)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PKG.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", "modules that need an optional package at import:\n" + res.stdout
