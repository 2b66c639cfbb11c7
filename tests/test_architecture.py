"""The package's import graph: no cycle, layers import only downward, operator packages stay pure.

Every ``import`` of a needlework module is read from the source (module level and inside functions), so
a lazy import that points upward fails here too. String-based imports (``importlib``) are the documented
exceptions: the deprecation aliases of ``needlework.mist`` and the lazy facades.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "needlework"

# lowest first; a module may import its own layer (if that makes no cycle) or any layer below
LAYERS = [
    {"registry", "errors", "checks", "_version", "_lazy", "profiling", "configs"},
    {"io"},
    {"ops"},
    {"ats", "topk", "mist", "metrics", "saliency"},
    {"data", "models"},
    {"slides"},
    {"viz"},
    {"training", "api"},
    {"cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from needlework.models import mist" may name a submodule
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def layer(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the lazy facade needlework/__init__.py sits above everything
    if parts[1] not in RANK:
        raise AssertionError(f"{mod}: add its package {parts[1]!r} to LAYERS in {__file__}")
    return RANK[parts[1]]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package importing its own submodules (registration) is not a cycle back through it
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_finder_sees_a_known_edge_and_a_planted_cycle():
    graph = import_graph()
    assert "needlework.ops.patches" in graph["needlework.topk"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    # submodules importing their own package __init__ (e.g. models.checkpoint -> models) are fine only if
    # that __init__ does not import them back; the general cycle check covers it
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downward():
    bad = []
    for mod, targets in import_graph().items():
        for t in targets:
            if layer(t) > layer(mod):
                bad.append(f"{mod} (layer {layer(mod)}) imports {t} (layer {layer(t)})")
    assert not bad, "\n".join(bad)


def test_registry_is_a_leaf():
    assert import_graph()["needlework.registry"] == set()


@pytest.mark.parametrize(
    "modules,forbidden",
    [
        ("needlework.ats, needlework.topk, needlework.ops, needlework.mist",
         ("lightning", "matplotlib", "h5py")),
        ("needlework", ("torch", "lightning", "matplotlib", "h5py")),
        ("needlework.registry", ("torch",)),
    ],
)
def test_imports_stay_light(modules, forbidden):
    code = f"import sys, {modules}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = _run(code)
    assert out.strip() == "", f"import {modules} loaded {out.strip()}"


def _run(code: str) -> str:
    """stdout of ``python -c code`` importing this checkout's package (not an installed copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKG.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


HEAVY = ("torch", "lightning", "matplotlib", "scipy", "skimage")


@pytest.mark.parametrize(
    "steps,forbidden",
    [
        # the tiling command's module and parser, and its --help (which builds the parser from the job
        # dataclasses): no torch (the embed job), no scipy/skimage (OpenCV does the tissue), no plotting
        ("import needlework.cli.slides as s; s.tile_parser()", HEAVY),
        ("from needlework.cli import main\ntry: main(['slides', 'tile', '--help'])\nexcept SystemExit: pass",
         HEAVY),
        ("import needlework.slides.jobs, needlework.slides.tiling, needlework.slides.tissue", HEAVY),
        ("from needlework.cli import main\ntry: main(['slides', 'embed', '--help'])\nexcept SystemExit: pass",
         HEAVY),
        # doctor probes torch in a child process; it imports no torch, lightning, matplotlib or models
        ("from needlework.cli import main; main(['doctor', '--min_free_gb', '0'])",
         ("torch", "lightning", "matplotlib", "needlework.models", "timm", "transformers")),
    ],
    ids=["tile-parser", "tile-help", "tiling-modules", "embed-help", "doctor"],
)
def test_commands_import_only_what_they_use(steps, forbidden):
    code = f"import sys\n{steps}\nprint('LOADED', [m for m in {forbidden!r} if m in sys.modules])"
    loaded = [line for line in _run(code).splitlines() if line.startswith("LOADED")][-1]
    assert loaded == "LOADED []", f"{steps!r} loaded {loaded[7:]}"


def test_no_two_modules_share_a_confusing_name():
    """One ``cli``, one ``pooling``, one ``heatmap``, one ``patches``, one ``megapixel_mnist`` module."""
    names = [p.stem for p in PKG.rglob("*.py") if p.stem != "__init__"]
    for name in ("cli", "pooling", "heatmap", "patches", "megapixel_mnist"):
        assert names.count(name) <= 1, f"{name}.py appears {names.count(name)} times"
