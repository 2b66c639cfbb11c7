"""benchmarks/peers.py: timing protocol, a `--quick` run's JSON schema, missing peers skipped (issue 16)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROW_KEYS = {"suite", "peer", "peer_version", "ours", "peer_time", "ratio"}
TIME_KEYS = {"median_s", "q1_s", "q3_s", "n"}


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("peers")


def test_time_pair_alternates_and_summarises(peers):
    calls: list[str] = []

    def recording_step(side):
        def step():
            calls.append(side)

        return step

    ours_t, peer_t = peers.time_pair(recording_step("o"), recording_step("p"), reps=4, warmup=1)
    # one warm-up round, then ABBA order: o p | p o | o p | p o
    assert calls == ["o", "p", "o", "p", "p", "o", "o", "p", "p", "o"]
    assert ours_t["n"] == peer_t["n"] == 4 and set(ours_t) >= TIME_KEYS
    times = [0.004, 0.001, 0.003, 0.002, 0.010, 0.005, 0.006]
    s = peers.summary(times)
    assert s["median_s"] == pytest.approx(float(np.median(times)))
    assert s["q1_s"] <= s["median_s"] <= s["q3_s"]
    assert peers.time_pair(recording_step("o"), None, reps=2, warmup=0)[1] is None


def test_quick_run_skips_missing_peers_and_still_times_ours(peers, monkeypatch, tmp_path):
    missing = lambda module: (None, f"{module} not importable (test)")  # noqa: E731
    monkeypatch.setattr(importlib.import_module("peers_cases"), "try_import", missing)
    monkeypatch.setattr(importlib.import_module("peers_tiling"), "try_import", missing)
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path / "cache"))  # the quick 2,048² slide
    out = tmp_path / "peers.json"
    assert peers.main(["--quick", "--reps", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"mil", "sparse_conv", "tiling", "ats", "extraction"}
    (ats,) = [r for r in rows if r["suite"] == "ats"]  # its "peer" is our own feature net: always timed
    assert ats["ratio"] > 0 and ats["patches_per_image"] == 10
    extraction = [r for r in rows if r["suite"] == "extraction"]  # its "peer" is a plain copy: always timed
    assert [r["n_patches"] for r in extraction] == [10, 64]
    for r in extraction:  # equal to the port's padded loop, which is timed too; some patches cross the border
        assert r["exact"] and r["border_patches"] > 0 and r["ratio"] > 0 and r["speedup_vs_port"] > 0
        assert r["output_bytes"] == 4 * r["batch"] * r["n_patches"] * r["patch"] ** 2
    rows = [r for r in rows if r["suite"] not in ("ats", "extraction")]
    tiling = [r for r in rows if r["suite"] == "tiling"]
    assert [(r["step"], r.get("seg_um"), r.get("workers")) for r in tiling] == [
        ("segment", 4.0, None), ("segment", 16.0, None), ("read", None, 0), ("read", None, 2)]
    assert all(r["reader"] == "tiffslide" and r["slide_side"] == 2048 for r in tiling)  # no OpenSlide
    assert {r.get("model") for r in rows if r["suite"] == "mil"} == {"abmil", "dsmil", "transmil"}
    batched = {(r["model"], r["padded"]) for r in rows if r["suite"] == "mil" and r.get("batch", 1) > 1}
    assert batched == {("abmil", True), ("dsmil", True), ("transmil", False)}  # torchmil's TransMIL: no mask
    for r in rows:
        assert set(r) >= ROW_KEYS
        assert r["peer_time"] is None and r["ratio"] is None and "not importable" in r["skipped"]
        assert r["ours"]["n"] == 1 and r["ours"]["median_s"] > 0
        if r["suite"] == "sparse_conv":  # our conv is checked against dense conv2d even without the peer
            assert r["ours_vs_dense_max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(
    importlib.util.find_spec("torchmil") is None or importlib.util.find_spec("spconv") is None,
    reason="peers not installed (pip install 'needlework[bench]')",
)
def test_quick_run_with_peers_matches_their_outputs(tmp_path):
    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(BENCH / "peers.py"),
        "--quick",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=120, env=env, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert r["ratio"] > 0 and r["peer_version"]
        if r["suite"] == "mil" and r["model"] != "transmil":
            assert r["logit_max_abs_diff"] < 1e-5  # same weights → same logits
            assert abs(r["params_ours"] - r["params_peer"]) <= 1  # ABMIL: the score bias torchmil omits
        if r["suite"] == "sparse_conv":
            assert r["spconv_vs_dense_max_abs_diff"] < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("openslide") is None, reason="openslide-python not installed")
def test_tiling_suite_times_both_sides_on_the_same_tiles(peers, monkeypatch, tmp_path):
    monkeypatch.setenv("NEEDLEWORK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "peers.json"
    args = ["--quick", "--suite", "tiling", "--reps", "1", "--warmup", "0", "--out", str(out)]
    assert peers.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["ratio"] > 0 and r["reader"] == "openslide" for r in rows)
    for r in rows:
        if r["step"] == "segment":  # both find the two large ellipses of the synthetic slide
            assert r["tiles_peer"] > 0 and r["tile_iou"] > 0.6
            assert 0.7 < r["tiles_ours"] / r["tiles_peer"] < 1.4
        else:
            assert r["pixels_equal"] and r["tiles"] > 0


def test_clam_steps_keep_patches_in_tissue_and_out_of_holes(monkeypatch):
    """CLAM's steps on a drawn thumbnail: one tissue square with a hole, a speck below the area filter."""
    monkeypatch.syspath_prepend(str(BENCH))
    clam = importlib.import_module("peers_tiling")
    rgb = np.full((200, 200, 3), 245, np.uint8)
    rgb[40:160, 40:160] = (200, 90, 160)  # tissue, ds 16: level-0 [640, 2560)²
    rgb[80:120, 80:120] = 245  # a hole of 40² thumbnail px (1,600 > a_h = one 512² patch = 1,024 px)
    rgb[5:8, 5:8] = (200, 90, 160)  # a speck: far below a_t = 5 reference patches
    mask = clam.clam_segment(rgb)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    pieces = clam.clam_contours(mask, 16.0, a_t=5, a_h=1)
    assert len(pieces) == 1 and len(pieces[0][1]) == 1  # the square, with its hole; no speck
    tiles = clam.clam_grid(pieces, 256)
    centres = tiles + 128
    assert len(tiles) > 0 and (centres >= 640 - 64).all() and (centres < 2560 + 64).all()
    in_hole = ((centres >= 80 * 16 + 32) & (centres < 120 * 16 - 32)).all(axis=1)  # contours cut corners
    assert not in_hole.any() and 40 < len(tiles) < 64  # 8 × 8 grid positions over the square, less the hole
    a = np.array([[0, 0]])
    assert clam.tile_overlap(a, np.array([[128, 0]])) == pytest.approx(1 / 3)  # half overlap: 1/2 / 3/2
    assert clam.tile_overlap(a, a) == 1.0 and clam.tile_overlap(a, np.array([[512, 512]])) == 0.0
