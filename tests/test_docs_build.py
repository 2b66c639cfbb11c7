"""``make docs``: the mkdocs site builds with ``--strict`` (no broken link, no unparsable docstring) and
has an API page for every package, generated from the docstrings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# page -> an object that must be documented on it (proves mkdocstrings rendered the package)
API_PAGES = {
    "ats": "needlework.ats.expectation.expectation",
    "topk": "needlework.topk.perturbed.perturbed_topk",
    "ops": "needlework.ops.patches.extract_patches",
    "mist": "needlework.mist.ideal",
    "metrics": "needlework.metrics.detection",
    "data": "needlework.data.needle_mnist.NeedleMNIST",
    "models": "needlework.models.bagnet",
    "models.mil": "needlework.models.mil.zoommil",
    "slides": "needlework.slides.tiling",
    "training": "needlework.training.task",
    "io": "needlework.io.h5",
    "viz": "needlework.viz.saliency",
    "registry": "needlework.registry.Registry",
}


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for page, obj in API_PAGES.items():
        html = (site / "api" / page / "index.html").read_text()
        assert f'id="{obj}"' in html, f"api/{page}: {obj} not documented"
    assert 'id="needlework.models.mil' not in (site / "api" / "models" / "index.html").read_text()
    index = (site / "index.html").read_text()
    assert "make demo" in index and "create_model" in index  # README essentials made it in
    assert (site / "ARCHITECTURE" / "index.html").is_file()
    assert (site / "design" / "METHODS" / "index.html").is_file()
