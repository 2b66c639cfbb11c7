"""benchmarks/slide_selection.py (issue 14, item 3): its pyramid writer and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tifffile")
pytest.importorskip("imagecodecs")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import slide_pyramid as sp  # noqa: E402
from needlework.slides.reader import available_readers, open_slide  # noqa: E402

READERS = [r for r, v in available_readers().items() if v is not None]


@pytest.mark.parametrize("backend", READERS)
def test_written_pyramid_is_readable_and_matches_the_generated_tiles(tmp_path, backend):
    side = 2300  # not a multiple of the tile: edge tiles are cropped
    info = sp.write_slide(tmp_path / "s.tif", side, mpp=0.25)
    slide = open_slide(tmp_path / "s.tif", reader=backend)
    assert slide.level_count == info["levels"] == 4  # 2300, 1150, 575, 287
    assert slide.level_dimensions == [(s, s) for s in (2300, 1150, 575, 287)]
    assert slide.mpp == pytest.approx(0.25)
    index, tiles = sp.cell_index(side), sp.base_tiles()
    # independent reference for level 0: the cell's texture (or glass), straight from the grid
    ty, tx = np.argwhere(index[:-1, :-1] < sp.N_TEXTURES)[0]
    got = slide.read_region((int(tx) * 256, int(ty) * 256), 0, (256, 256)).astype(float)
    want = tiles[index[ty, tx]].astype(float)
    assert np.abs(got - want).mean() < 4  # JPEG q90 error only
    assert want.std() > 10  # a textured tissue tile, so the comparison is not trivial
    glass = slide.read_region((0, 0), 0, (256, 256)).astype(float)
    assert np.abs(glass - sp.GLASS).max() < 4
    # level 2 is the 4 × 4 box mean of level 0 (same place, both through the reader)
    full = slide.read_region((0, 0), 0, (1024, 1024)).astype(float)
    lvl2 = slide.read_region((0, 0), 2, (256, 256)).astype(float)
    assert np.abs(full.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3)) - lvl2).mean() < 3


def test_tissue_fraction_and_layout_do_not_depend_on_the_size():
    small, big = sp.tissue_cells(20000), sp.tissue_cells(100000)
    assert small.mean() == pytest.approx(0.10, abs=0.01)
    assert big.mean() == pytest.approx(0.10, abs=0.005)
    # the same ellipses: the big grid, subsampled to the small one's cells, agrees almost everywhere
    n = small.shape[0]
    pick = ((np.arange(n) + 0.5) * big.shape[0] / n).astype(int)
    assert (big[np.ix_(pick, pick)] == small).mean() > 0.98


def test_write_slide_rejects_a_tiny_side(tmp_path):
    with pytest.raises(ValueError, match="side"):
        sp.write_slide(tmp_path / "x.tif", 100)


@pytest.mark.slow
def test_main_writes_json_and_figure(tmp_path, monkeypatch):
    import slide_selection

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, fig = tmp_path / "r.json", tmp_path / "f.png"
    common = ["--repeats", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    slide_selection.main(["--sizes", "1024", "2048", *common, "--out", str(out), "--figure", str(fig)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "slide_selection"
    assert {"settings", "environment", "memory_measure", "slides", "rows"} <= set(data)
    assert len(data["rows"]) == 6
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["method"] in ("ats", "dps", "ips") and row["side"] in (1024, 2048)
        assert row["step_s"] > 0 and row["peak_mb"] > row["increment_mb"] > 0
        assert row["patches_read"] > 0 and row["write_s"] > 0
        # x_low at 8 µm/px of a 0.25 µm/px slide: side / 32 (padded up to whole patches)
        assert row["x_low"][1] >= row["side"] // 32
    ips = [r for r in data["rows"] if r["method"] == "ips"]
    assert ips[1]["candidates"] > ips[0]["candidates"] > 0  # more tissue patches on the bigger slide
    assert fig.stat().st_size > 10_000
    # a second run reuses the cached slides
    slide_selection.main(
        ["--sizes", "1024", "--methods", "ats", *common, "--out", str(out), "--figure", str(fig)]
    )
    assert json.loads(out.read_text())["slides"]["1024"]["cached"] is True
