"""``kill -9`` in the middle of ``slides tile`` and ``slides embed``, then a plain rerun.

The killed run leaves its lock and a half-written temporary file; the rerun must take the lock over (its
owner is dead), finish every slide, exit 0 and give the same files as a run that was never interrupted.
"""

from __future__ import annotations

import json

from faults.fault_helpers import (
    N_SLIDES,
    TILING,
    assert_same_outputs,
    embed_args,
    kill9_in_the_middle,
    run_cli,
    tile_args,
)


def test_kill9_during_tile_then_rerun_loses_nothing(small_cohort, reference, tmp_path):
    slides, job = small_cohort["slides_dir"], tmp_path / "job"
    tdir = job / TILING.dir_name()
    kill9_in_the_middle(
        "needlework.slides.jobs", "write_patches_h5", "slide_001", tile_args(slides, job), tmp_path / "m"
    )
    lock = tdir / "wsi_states" / "tile" / "slide_001.lock"
    assert lock.exists(), "the killed run leaves its lock (this is the fault)"
    assert not (tdir / "patches" / "slide_001_patches.h5").exists()
    rerun = run_cli(tile_args(slides, job))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "busy" not in rerun.stdout.replace("0 busy", "")
    summary = json.loads((tdir / "wsi_states" / "tile" / "summary.json").read_text())
    assert summary["counts"]["busy"] == 0
    assert summary["counts"]["done"] + summary["counts"]["skipped"] == N_SLIDES
    state = json.loads((tdir / "wsi_states" / "tile" / "slide_001.json").read_text())
    assert state["status"] == "done" and any("took over the lock" in w for w in state["warnings"])
    assert not lock.exists()
    embed = run_cli(embed_args(slides, job))
    assert embed.returncode == 0, embed.stdout + embed.stderr
    assert assert_same_outputs(tdir, reference) == 6 * N_SLIDES


def test_kill9_during_embed_then_rerun_loses_nothing(small_cohort, reference, tmp_path):
    slides, job = small_cohort["slides_dir"], tmp_path / "job"
    tdir = job / TILING.dir_name()
    assert run_cli(tile_args(slides, job)).returncode == 0
    kill9_in_the_middle(
        "needlework.slides.embed_job",
        "write_features_h5",
        "slide_002",
        embed_args(slides, job),
        tmp_path / "m",
    )
    lock = tdir / "wsi_states" / "embed_color_stats" / "slide_002.lock"
    assert lock.exists()
    assert not (tdir / "features_color_stats" / "slide_002.h5").exists()
    rerun = run_cli(embed_args(slides, job))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((tdir / "wsi_states" / "embed_color_stats" / "summary.json").read_text())
    assert summary["counts"]["busy"] == 0 and summary["counts"]["done"] == 1
    assert summary["counts"]["skipped"] == N_SLIDES - 1
    assert assert_same_outputs(tdir, reference) == 6 * N_SLIDES


def test_a_live_owner_keeps_its_slide_and_the_run_exits_nonzero(small_cohort, tmp_path):
    """A lock held by a running process is respected: the slide is named busy, with its lock path, in the
    console and summary.md, and the run exits 1 (part of the job is not done)."""
    from needlework.slides.locks import SlideLock

    slides, job = small_cohort["slides_dir"], tmp_path / "job"
    tdir = job / TILING.dir_name()
    lock = SlideLock(tdir / "wsi_states" / "tile" / "slide_000.lock")
    assert lock.acquire()
    try:
        out = run_cli(tile_args(slides, job))
    finally:
        lock.release()
    assert out.returncode == 1, out.stdout + out.stderr
    assert "slide_000" in out.stdout and str(lock.path) in out.stdout
    md = (tdir / "wsi_states" / "tile" / "summary.md").read_text()
    assert "## Busy" in md and str(lock.path) in md
    again = run_cli(tile_args(slides, job))  # the owner finished (released): the rerun completes
    assert again.returncode == 0 and "1 done" in again.stdout
