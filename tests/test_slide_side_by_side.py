"""benchmarks/slide_side_by_side.py: the lesion-overlap test against hand-computed cases, and a seconds-long
run of one pixel and one feature model on a tiny texture cohort writing the JSON rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import slide_side_by_side as sbs


def _square(x0: float, y0: float, s: float, n: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, n, endpoint=False)
    edges = [np.c_[x0 + s * t, np.full(n, y0)], np.c_[np.full(n, x0 + s), y0 + s * t],
             np.c_[x0 + s - s * t, np.full(n, y0 + s)], np.c_[np.full(n, x0), y0 + s - s * t]]  # fmt: skip
    return np.concatenate(edges)


def test_box_hits_hand_computed() -> None:
    lesion = _square(100, 100, 20)  # [100, 120]²
    corners = np.array([
        [0, 0],      # far away
        [90, 90],    # overlaps the lesion's top-left corner
        [105, 105],  # inside the lesion, smaller than it (no lesion vertex inside the box)
        [60, 60],    # contains the whole lesion
        [121, 100],  # just right of it
        [80, 105],   # crosses the left edge
    ], dtype=np.float64)  # fmt: skip
    sides = np.array([16, 16, 8, 80, 16, 25])
    got = [bool(sbs.box_hits(c[None], s, [lesion])[0]) for c, s in zip(corners, sides)]
    assert got == [False, True, True, True, False, True]
    assert not sbs.box_hits(corners, 16, []).any()


def test_quick_run_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "sbs.json"
    code = sbs.main(["--quick", "--methods", "ips", "abmil", "--minutes", "0.05", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"ips", "abmil"}
    for name, row in rows.items():
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["test_auroc"] <= 1, name
        assert row["loc_slides"] >= 1 and 0 <= row["loc"] <= 1 and 0 < row["loc_chance"] < 1, name
        assert row["epochs"] >= 1 and row["total_s"] >= row["fit_wall_s"] > 0, name
    prep = data["preparation"]["mags"]
    assert set(prep) == {"40"} and rows["abmil"]["total_s"] == pytest.approx(
        rows["abmil"]["fit_wall_s"] + prep["40"]["tile_s"] + prep["40"]["embed_s"]
    )
    assert rows["ips"]["total_s"] == rows["ips"]["fit_wall_s"]  # pixels: nothing to tile or embed
    # a rerun with the same settings measures nothing again
    mtime = out.stat().st_mtime_ns
    assert sbs.main(["--quick", "--methods", "ips", "--minutes", "0.05", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    assert out.stat().st_mtime_ns == mtime
