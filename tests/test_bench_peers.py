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
    cases = importlib.import_module("peers_cases")
    monkeypatch.setattr(cases, "try_import", lambda module: (None, f"{module} not importable (test)"))
    out = tmp_path / "peers.json"
    assert peers.main(["--quick", "--reps", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"mil", "sparse_conv"}
    assert {r.get("model") for r in rows if r["suite"] == "mil"} == {"abmil", "dsmil", "transmil"}
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
