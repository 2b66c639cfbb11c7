"""Two runs on one job folder at once, and a full disk (a write that fails with ENOSPC)."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys

import pytest

from faults.fault_helpers import (
    N_SLIDES,
    TILING,
    assert_same_outputs,
    embed_args,
    env,
    run_cli,
    tile_args,
    tile_config,
)
from needlework.slides import status as status_module
from needlework.slides.jobs import run_tiling


def _counts(stdout: str) -> dict[str, int]:
    line = next(ln for ln in stdout.splitlines() if re.match(r"(tile|embed): \d+ slides", ln))
    return {k: int(v) for v, k in re.findall(r"(\d+) (done|skipped|busy|failed|no_tissue)", line)}


@pytest.mark.parametrize("stage", ["tile", "embed"])
def test_two_concurrent_runs_share_the_job_and_do_each_slide_once(small_cohort, reference, tmp_path, stage):
    slides, job = small_cohort["slides_dir"], tmp_path / "job"
    if stage == "embed":
        assert run_cli(tile_args(slides, job)).returncode == 0
    args = [*(tile_args if stage == "tile" else embed_args)(slides, job), "--wait_busy_s", "120"]
    cmd = [sys.executable, "-m", "needlework", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    counts = [_counts(out) for out, _ in outs]
    assert sum(c.get("done", 0) for c in counts) == N_SLIDES, counts  # each slide done exactly once
    assert all(c.get("busy", 0) == 0 and c.get("failed", 0) == 0 for c in counts), counts
    tdir = job / TILING.dir_name()
    assert not list(tdir.rglob("*.lock")) and not list(tdir.rglob("*.tmp*"))
    if stage == "embed":
        assert assert_same_outputs(tdir, reference) == 6 * N_SLIDES


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_patch_file_loses_nothing(small_cohort, reference, tmp_path, monkeypatch):
    """h5py fails with ENOSPC on one slide: that slide fails with the OS error, no partial or temporary
    file stays, the others finish; once there is space again the rerun completes with identical files."""
    import h5py

    from needlework.io import h5 as h5_module

    slides = small_cohort["slides_dir"]
    real_file = h5py.File

    def full_disk_for_slide_001(path, mode="r", *a, **k):
        if "w" in mode and "slide_001" in str(path):
            f = real_file(path, mode, *a, **k)
            f.create_dataset = _enospc  # the file exists, the data cannot be written
            return f
        return real_file(path, mode, *a, **k)

    monkeypatch.setattr(h5_module.h5py, "File", full_disk_for_slide_001)
    summary = run_tiling(slides, tile_config(tmp_path), skip_errors=True)
    monkeypatch.setattr(h5_module.h5py, "File", real_file)
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == N_SLIDES - 1
    assert "No space left on device" in summary["failures"][0]["error"]
    tdir = tmp_path / TILING.dir_name()
    assert not (tdir / "patches" / "slide_001_patches.h5").exists() and not list(tdir.rglob("*.tmp*"))
    out = run_cli(tile_args(slides, tmp_path))  # disk freed
    assert out.returncode == 0 and _counts(out.stdout) == {"done": 1, "skipped": N_SLIDES - 1}, out.stdout
    assert run_cli(embed_args(slides, tmp_path)).returncode == 0
    assert assert_same_outputs(tdir, reference) == 6 * N_SLIDES


@pytest.mark.parametrize("writer", ["write_json_atomic", "write_text_atomic", "save_png_atomic"])
def test_full_disk_in_small_file_writes_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, writer):
    import numpy as np

    path = tmp_path / "out.bin"
    write = getattr(status_module, writer)
    payload = {"write_json_atomic": {"a": 1}, "write_text_atomic": "old", "save_png_atomic": None}[writer]
    payload = np.zeros((4, 4), np.uint8) if payload is None else payload
    write(path, payload)
    before = path.read_bytes()
    monkeypatch.setattr(status_module.os, "replace", _enospc)  # fails after the temporary file is written
    with pytest.raises(OSError, match="No space left"):
        write(path, payload)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_summary_lists_the_failure_and_json_stays_valid(small_cohort, tmp_path, monkeypatch):
    import h5py

    from needlework.io import h5 as h5_module

    real_file = h5py.File
    monkeypatch.setattr(
        h5_module.h5py, "File", lambda p, mode="r", *a, **k: _enospc() if "w" in mode else real_file(p, mode)
    )
    run_tiling(small_cohort["slides_dir"], tile_config(tmp_path), skip_errors=True)
    state_dir = tmp_path / TILING.dir_name() / "wsi_states" / "tile"
    summary = json.loads((state_dir / "summary.json").read_text())
    assert summary["counts"]["failed"] == N_SLIDES
    assert "No space left on device" in (state_dir / "summary.md").read_text()
