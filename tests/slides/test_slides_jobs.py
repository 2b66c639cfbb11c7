"""Tile/embed jobs: resume, status files, skip-errors, embedding, Ray equivalence."""

from __future__ import annotations

import json
import shutil
import time

import h5py
import numpy as np
import pytest
from slide_helpers import N_SLIDES, TILING, artefacts, embed_config, tile_config

from needlework.io.h5 import read_coords, read_features
from needlework.slides import embed_job, jobs
from needlework.slides.embed import embed_tiles
from needlework.slides.embed_job import run_embedding
from needlework.slides.jobs import run_tiling
from needlework.slides.reader import open_slide
from needlework.slides.stage_runner import SlideJobError
from needlework.slides.status import SlideLock


def test_job_outputs_and_status(job):
    tdir = job["tiling_dir"]
    assert job["tile"]["counts"]["done"] == N_SLIDES and job["embed"]["counts"]["done"] == N_SLIDES
    for sid in [f"slide_{i:03d}" for i in range(N_SLIDES)]:
        status = json.loads((tdir / "wsi_states" / "tile" / f"{sid}.json").read_text())
        assert status["status"] == "done" and status["n_tiles"] > 0 and status["mpp_level0"] == 0.25
        for folder, ext in (
            ("thumbnails", "png"),
            ("tissue_masks", "png"),
            ("visualization", "png"),
            ("contours_geojson", "geojson"),
        ):
            assert (tdir / folder / f"{sid}.{ext}").is_file()
        feats, coords, attrs = read_features(tdir / "features_color_stats" / f"{sid}.h5")
        pcoords, pattrs = read_coords(tdir / "patches" / f"{sid}_patches.h5")
        np.testing.assert_array_equal(coords, pcoords)
        assert feats.dtype == np.float32 and feats.shape == (len(coords), 39)
        assert attrs["encoder"] == "color_stats" and attrs["patch_size_level0"] == pattrs["patch_size_level0"]
    assert (
        json.loads((tdir / "wsi_states" / "tile" / "slide_003.json").read_text())["mpp_source"] == "override"
    )
    summary = json.loads((tdir / "wsi_states" / "embed_color_stats" / "summary.json").read_text())
    assert summary["counts"]["done"] == N_SLIDES and summary["failures"] == []
    assert not list(tdir.rglob("*.tmp*")) and not list(tdir.rglob("*.lock"))


def test_embedding_matches_a_direct_encoder_call(cohort, job):
    """Independent reference: read each tile with the reader and run the encoder by hand."""
    from needlework.models.encoder_loading import build_tile_encoder

    tdir = job["tiling_dir"]
    feats, coords, _ = read_features(tdir / "features_color_stats" / "slide_001.h5")
    enc = build_tile_encoder("color_stats")
    import torch

    with open_slide(cohort["slides_dir"] / "slide_001.tif") as slide:
        for i in (0, len(coords) // 2, len(coords) - 1):
            x, y = coords[i]
            tile = slide.read_region_at(int(x), int(y), 256, 256, 128, 128)
            ref = enc(torch.from_numpy(tile.copy()).permute(2, 0, 1)[None].float() / 255)[0].numpy()
            np.testing.assert_allclose(feats[i], ref, rtol=1e-5, atol=1e-6)


def test_worker_processes_and_precision(cohort, job):
    from needlework.models.encoder_loading import build_tile_encoder

    coords, _ = read_coords(job["tiling_dir"] / "patches" / "slide_000_patches.h5")
    coords = coords[:20]
    enc = build_tile_encoder("resnet8", width=8)
    path = cohort["slides_dir"] / "slide_000.tif"
    single = embed_tiles(path, coords, 256, 64, enc, batch_size=8, num_workers=0, device="cpu")
    multi = embed_tiles(path, coords, 256, 64, enc, batch_size=8, num_workers=2, device="cpu")
    np.testing.assert_array_equal(single, multi)
    half = embed_tiles(path, coords, 256, 64, enc, batch_size=8, precision="bf16", device="cpu")
    assert half.dtype == np.float32 and np.abs(half - single).max() < 0.1 * np.abs(single).max()
    with pytest.raises(ValueError, match="precision"):
        embed_tiles(path, coords, 256, 64, enc, precision="fp8", device="cpu")


def _interrupt_on(monkeypatch, module, name, slide_id):
    """Make <module>.<name> leave a half-written temporary file for ``slide_id`` and die like a killed run."""
    real = getattr(module, name)

    def flaky(path, *args, **kwargs):
        if slide_id in str(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / (path.name + ".tmp99999")).write_bytes(b"\x89HDF half written")
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, flaky)


def test_resume_after_interruption_gives_identical_files(cohort, job, tmp_path, monkeypatch):
    cfg = tile_config(tmp_path)
    with monkeypatch.context() as m:
        _interrupt_on(m, jobs, "write_patches_h5", "slide_002")
        with pytest.raises(KeyboardInterrupt):
            run_tiling(cohort["slides_dir"], cfg, mpp_csv=cohort["mpp_csv"])
    tdir = cfg.tiling_dir
    assert not (tdir / "patches" / "slide_002_patches.h5").exists()  # never a half file under the final name
    assert not list(tdir.rglob("*.lock"))
    summary = run_tiling(cohort["slides_dir"], cfg, mpp_csv=cohort["mpp_csv"])
    assert summary["counts"]["skipped"] == 2 and summary["counts"]["done"] == 2
    ecfg = embed_config(tmp_path)
    with monkeypatch.context() as m:
        _interrupt_on(m, embed_job, "write_features_h5", "slide_001")
        with pytest.raises(KeyboardInterrupt):
            run_embedding(cohort["slides_dir"], ecfg)
    summary = run_embedding(cohort["slides_dir"], ecfg)
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["done"] == N_SLIDES - 1
    ours, reference = artefacts(tdir), artefacts(job["tiling_dir"])
    ours = {k: v for k, v in ours.items() if ".tmp" not in k}  # the stray temporary files are ignored
    assert ours.keys() == reference.keys()
    for name in reference:
        assert ours[name] == reference[name], f"{name} differs from the uninterrupted run"


def test_changed_settings_redo_instead_of_skipping(cohort, job, tmp_path):
    import dataclasses

    shutil.copytree(job["tiling_dir"], tmp_path / TILING.dir_name())
    cfg = tile_config(tmp_path)
    again = run_tiling(cohort["slides_dir"], cfg, mpp_csv=cohort["mpp_csv"])
    assert again["counts"]["skipped"] == N_SLIDES
    assert run_embedding(cohort["slides_dir"], embed_config(tmp_path))["counts"]["skipped"] == N_SLIDES
    stricter = dataclasses.replace(cfg, tiling=dataclasses.replace(TILING, min_tissue_fraction=0.9))
    stricter.tiling.dir_name()  # same folder: the tissue threshold is not part of the name
    redo = run_tiling(cohort["slides_dir"], stricter, mpp_csv=cohort["mpp_csv"])
    assert redo["counts"]["done"] == N_SLIDES
    fewer = read_coords(tmp_path / TILING.dir_name() / "patches" / "slide_000_patches.h5")[0]
    assert len(fewer) < len(read_coords(job["tiling_dir"] / "patches" / "slide_000_patches.h5")[0])
    # Features made from the old patch files are stale: embedding redoes them.
    assert run_embedding(cohort["slides_dir"], embed_config(tmp_path))["counts"]["done"] == N_SLIDES
    _, coords, _ = read_features(tmp_path / TILING.dir_name() / "features_color_stats" / "slide_000.h5")
    np.testing.assert_array_equal(coords, fewer)


def test_corrupt_slides_fail_clearly_and_skip_errors_goes_on(cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("slide_000.tif", "slide_001.tif"):
        shutil.copy(cohort["slides_dir"] / name, slides / name)
    data = (cohort["slides_dir"] / "slide_002.tif").read_bytes()
    (slides / "a_truncated.tif").write_bytes(data[: len(data) // 3])
    (slides / "b_garbage.svs").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(SlideJobError, match=r"(?s)slide a_truncated .*--skip_errors"):
        run_tiling(slides, tile_config(tmp_path / "stop"))
    summary = run_tiling(slides, tile_config(tmp_path / "go"), skip_errors=True)
    assert summary["counts"]["failed"] == 2 and summary["counts"]["done"] == 2
    assert [f["slide_id"] for f in summary["failures"]] == ["a_truncated", "b_garbage"]
    state = json.loads(
        (tmp_path / "go" / TILING.dir_name() / "wsi_states" / "tile" / "a_truncated.json").read_text()
    )
    assert state["status"] == "failed" and "a_truncated.tif" in state["error"] and state["traceback"]
    md = (tmp_path / "go" / TILING.dir_name() / "wsi_states" / "tile" / "summary.md").read_text()
    assert "b_garbage" in md and "## Failures" in md
    # The failed slides are retried on the next run; finished ones are skipped.
    again = run_tiling(slides, tile_config(tmp_path / "go"), skip_errors=True)
    assert again["counts"]["skipped"] == 2 and again["counts"]["failed"] == 2


def test_missing_mpp_fails_that_slide_with_the_fix(cohort, tmp_path):
    summary = run_tiling(cohort["slides_dir"], tile_config(tmp_path), skip_errors=True)  # no --mpp_csv
    assert [f["slide_id"] for f in summary["failures"]] == ["slide_003"]
    assert "--mpp_csv" in summary["failures"][0]["error"]


def test_no_tissue_is_reported_not_skipped(tmp_path):
    from needlework.slides.synthetic import SyntheticSlideSpec, make_synthetic_slide

    slides = tmp_path / "slides"
    make_synthetic_slide(
        slides / "empty.tif", SyntheticSlideSpec(width=1024, height=768, n_tissue=0, n_lesions=0)
    )
    with pytest.warns(UserWarning, match="no tissue found"):
        summary = run_tiling(slides, tile_config(tmp_path / "job"))
    assert summary["counts"]["no_tissue"] == 1 and summary["no_tissue"] == ["empty"]
    embed = run_embedding(slides, embed_config(tmp_path / "job"))
    assert embed["counts"]["no_tissue"] == 1


def test_embed_without_tiles_fails_with_hint(cohort, tmp_path):
    summary = run_embedding(cohort["slides_dir"], embed_config(tmp_path), skip_errors=True)
    assert summary["counts"]["failed"] == N_SLIDES
    assert "needlework slides tile" in summary["failures"][0]["error"]


def test_locked_slide_is_left_to_its_owner(cohort, job, tmp_path):
    cfg = tile_config(tmp_path)
    lock = SlideLock(cfg.tiling_dir / "wsi_states" / "tile" / "slide_000.lock")
    assert lock.acquire()
    try:
        summary = run_tiling(cohort["slides_dir"], cfg, mpp_csv=cohort["mpp_csv"])
        assert summary["counts"]["busy"] == 1 and summary["counts"]["done"] == N_SLIDES - 1
    finally:
        lock.release()
    stale = SlideLock(cfg.tiling_dir / "wsi_states" / "tile" / "x.lock", stale_after=0.0)
    stale.path.write_text("{}")
    time.sleep(0.01)
    assert stale.acquire()  # an abandoned lock is taken over
    stale.release()


def test_ray_run_equals_local_run(cohort, job, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'needlework[ray]')")
    from needlework.slides.ray_runner import local_runtime_env

    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=local_runtime_env(), log_to_driver=False)
    try:
        tile = run_tiling(
            cohort["slides_dir"], tile_config(tmp_path), mpp_csv=cohort["mpp_csv"], ray_address="local"
        )
        embed = run_embedding(cohort["slides_dir"], embed_config(tmp_path), ray_address="local")
    finally:
        ray.shutdown()
    assert tile["counts"]["done"] == N_SLIDES and embed["counts"]["done"] == N_SLIDES
    ours_dir, reference_dir = tmp_path / TILING.dir_name(), job["tiling_dir"]
    ours, reference = artefacts(ours_dir), artefacts(reference_dir)
    assert ours.keys() == reference.keys()
    for name in reference:
        if name.startswith("features_"):
            # Ray workers run torch with one thread, this process with two: feature sums may differ in the
            # last bits (reduction order), everything else must be identical.
            assert_same_features(ours_dir / name, reference_dir / name)
        else:
            assert ours[name] == reference[name], name
    with h5py.File(tmp_path / TILING.dir_name() / "features_color_stats" / "slide_000.h5") as f:
        assert f["features"].shape[0] > 0
    print(f"ray run: {time.time() - t0:.1f} s")


def test_edited_contours_replace_the_segmentation(cohort, job, tmp_path):
    """The QuPath loop: contours exported by a tile run, re-imported as the tissue of the next run."""
    contours = job["tiling_dir"] / "contours_geojson"
    cfg = tile_config(tmp_path, tissue_geojson_dir=str(contours))
    summary = run_tiling(cohort["slides_dir"], cfg, mpp_csv=cohort["mpp_csv"])
    assert summary["counts"]["done"] == N_SLIDES
    for i in range(N_SLIDES):
        name = f"slide_{i:03d}_patches.h5"
        ours, attrs = read_coords(cfg.tiling_dir / "patches" / name)
        ref = read_coords(job["tiling_dir"] / "patches" / name)[0]
        assert attrs["segmenter"] == "geojson"
        common = {tuple(c) for c in ours.tolist()} & {tuple(c) for c in ref.tolist()}
        assert len(common) >= 0.9 * max(len(ours), len(ref))
    (tmp_path / "empty").mkdir()
    missing = run_tiling(
        cohort["slides_dir"],
        tile_config(tmp_path / "m", tissue_geojson_dir=str(tmp_path / "empty")),
        mpp_csv=cohort["mpp_csv"],
        skip_errors=True,
    )
    assert (
        missing["counts"]["failed"] == N_SLIDES
        and "tissue GeoJSON not found" in missing["failures"][0]["error"]
    )


def assert_same_features(path, reference):
    """Same datasets, attributes and coordinates; features equal to float32 round-off."""
    with h5py.File(path) as f, h5py.File(reference) as g:
        assert sorted(f) == sorted(g), path
        for key in g:
            assert dict(f[key].attrs).keys() == dict(g[key].attrs).keys(), (path, key)
            a, b = f[key][()], g[key][()]
            if key == "features":
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{path}:{key}")
