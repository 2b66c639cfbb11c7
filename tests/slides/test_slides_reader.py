"""Slide readers and microns-per-pixel handling."""

from __future__ import annotations

import multiprocessing
import os
import warnings

import numpy as np
import pytest

from needlework.slides import backends as backends_mod
from needlework.slides import reader as reader_mod
from needlework.slides.mpp import MissingMPPError, load_mpp_overrides, resolve_mpp
from needlework.slides.reader import ArrayReader, SlideOpenError, open_slide
from needlework.slides.stage_runner import make_tasks


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_mpp_and_levels_from_metadata(cohort, backend):
    with open_slide(cohort["slides_dir"] / "slide_000.tif", reader=backend) as slide:
        assert slide.backend == backend
        assert slide.mpp == pytest.approx(0.25)
        assert slide.magnification == pytest.approx(40.0)
        assert slide.dimensions == (2048, 1536)
        assert slide.level_downsamples[:3] == pytest.approx([1.0, 2.0, 4.0])


def test_readers_return_identical_rgb(cohort):
    path = cohort["slides_dir"] / "slide_001.tif"
    with open_slide(path, "openslide") as a, open_slide(path, "tiffslide") as b:
        for level in range(a.level_count):
            ra, rb = a.read_region((300, 200), level, (97, 61)), b.read_region((300, 200), level, (97, 61))
            assert ra.shape == (61, 97, 3) and ra.dtype == np.uint8
            np.testing.assert_array_equal(ra, rb)


def test_openslide_transparent_pixels_read_white_and_arrays_are_writable(cohort, monkeypatch):
    """Opaque regions take Pillow's RGB conversion, regions with unscanned (alpha 0) pixels the masked
    path; both give the RGB bytes, white where nothing was scanned, in an array the caller may modify."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    holed = rgba.copy()
    holed[5:9, 10:30] = 0  # OpenSlide's premultiplied "nothing here": all four bytes 0
    with open_slide(cohort["slides_dir"] / "slide_000.tif", "openslide") as slide:
        for source in (rgba, holed):
            monkeypatch.setattr(slide._slide, "read_region", lambda *a, src=source: Image.fromarray(src))
            out = slide.read_region((0, 0), 0, (50, 40))
            expected = source[..., :3].copy()
            expected[source[..., 3] == 0] = 255
            np.testing.assert_array_equal(out, expected)
            assert out.flags.writeable and out.flags.c_contiguous
            out[0, 0] = 7  # never "assignment destination is read-only"


def test_missing_mpp_is_a_loud_error_and_override_fixes_it(cohort):
    path = cohort["slides_dir"] / "slide_003.tif"
    with open_slide(path) as slide, pytest.raises(MissingMPPError, match=r"slide_003\.tif.*--mpp_csv"):
        _ = slide.mpp
    with open_slide(path, mpp_override=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_info.source == "override"
    tasks, unknown = make_tasks(cohort["slides_dir"], cohort["mpp_csv"])
    assert {t.slide_id: t.mpp_override for t in tasks}["slide_003"] == 0.25
    assert unknown == []


def test_mpp_resolution_order_and_units():
    assert resolve_mpp({"aperio.MPP": "0.2527"}, "a.svs").mpp == pytest.approx(0.2527)
    inch = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "101600"}
    assert resolve_mpp(inch, "a.tif").mpp == pytest.approx(25400 / 101600)
    ome = {"tiff.ImageDescription": '<OME><Pixels PhysicalSizeX="0.3250" PhysicalSizeY="0.3250"/></OME>'}
    assert resolve_mpp(ome, "a.ome.tif").source == "ome.PhysicalSizeX"
    both = {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", "aperio.MPP": "0.25"}
    assert resolve_mpp(both, "a.svs").mpp == 0.5  # openslide's key comes first
    assert resolve_mpp(both, "a.svs", override=0.3).mpp == 0.3  # the override wins


def test_mpp_fallbacks_warn_and_errors_name_the_slide():
    with pytest.warns(UserWarning, match="objective power"):
        info = resolve_mpp({"openslide.objective-power": "20"}, "b.svs")
    assert info.mpp == pytest.approx(0.5) and info.magnification == 20
    with pytest.raises(MissingMPPError, match=r"c\.ndpi: no microns-per-pixel"):
        resolve_mpp({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}, "c.ndpi")
    with pytest.raises(MissingMPPError, match="implausible"):
        resolve_mpp({"openslide.mpp-x": "250", "openslide.mpp-y": "250"}, "d.svs")
    assert resolve_mpp({"openslide.mpp-x": "250"}, "d.svs", allow_implausible=True).mpp == 250
    with pytest.warns(UserWarning, match="differ"):
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}, "e.svs")


def test_override_csv_formats_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("wsi,mpp\nx.svs,0.25\ny.tif,0.5\n")
    assert load_mpp_overrides(tmp_path / "a.csv") == {"x.svs": 0.25, "y.tif": 0.5}
    (tmp_path / "b.csv").write_text("slide_id,mpp\nx,0.25\n")
    assert load_mpp_overrides(tmp_path / "b.csv") == {"x": 0.25}
    (tmp_path / "c.csv").write_text("name,res\nx,0.25\n")
    with pytest.raises(ValueError, match="'wsi,mpp'"):
        load_mpp_overrides(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("wsi,mpp\nx.svs,abc\n")
    with pytest.raises(ValueError, match="line 2"):
        load_mpp_overrides(tmp_path / "d.csv")


def test_unknown_override_entries_are_reported(cohort, tmp_path):
    csv = tmp_path / "mpp.csv"
    csv.write_text("wsi,mpp\nslide_003.tif,0.25\nnot_there.svs,0.5\n")
    with pytest.warns(UserWarning, match="not_there"):
        _, unknown = make_tasks(cohort["slides_dir"], csv)
    assert unknown == ["not_there.svs"]


def test_read_at_target_resolution_uses_the_pyramid_and_area_filter(cohort):
    with open_slide(cohort["slides_dir"] / "slide_000.tif") as slide:
        assert slide.best_level(2.0) == 1 and slide.best_level(1.99) == 1  # 1 % tolerance
        assert slide.best_level(1.95) == 0 and slide.best_level(3.9) == 1
        x, y = 512, 384
        tile = slide.read_region_at(x, y, 256, 256, 128, 128)  # 20× from a 40× slide → level 1, no resize
        level1 = slide.read_region((x, y), 1, (128, 128))
        np.testing.assert_array_equal(tile, level1)
        # Independent reference: 2×2 mean of level 0 (JPEG + rounding differences only).
        full = slide.read_region((x, y), 0, (256, 256)).astype(np.float64)
        ref = full.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(tile - ref).mean() < 4.0
        # A downsample between levels reads the finer level and area-resizes.
        odd = slide.read_region_at(x, y, 300, 300, 100, 100)
        ref3 = slide.read_region((x, y), 2, (75, 75)).astype(np.float64)
        assert odd.shape == (100, 100, 3) and np.abs(odd.mean() - ref3.mean()) < 3.0


def test_xy_is_column_row_and_outside_reads_white():
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:9, 30:37] = (255, 0, 0)  # a block at rows 5..8, columns 30..36
    slide = ArrayReader(img, mpp=1.0)
    assert slide.dimensions == (60, 40)
    np.testing.assert_array_equal(slide.read_region((30, 5), 0, (7, 4)), img[5:9, 30:37])
    edge = slide.read_region((55, 35), 0, (10, 10))
    np.testing.assert_array_equal(edge[:5, :5], img[35:40, 55:60])
    assert (edge[5:] == 255).all() and (edge[:, 5:] == 255).all()
    with pytest.warns(UserWarning, match="upsampling"):
        up = slide.read_region_at(0, 0, 10, 10, 20, 20)
    assert up.shape == (20, 20, 3)


def test_auto_reader_falls_back_to_tiffslide(cohort, monkeypatch):
    class Broken(reader_mod.OpenSlideReader):
        def __init__(self, *a, **k):
            raise RuntimeError("simulated OpenSlide failure")

    monkeypatch.setattr(reader_mod, "OpenSlideReader", Broken)
    with open_slide(cohort["slides_dir"] / "slide_000.tif") as slide:
        assert slide.backend == "tiffslide"


def test_unreadable_file_lists_every_reader(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all" * 100)
    with pytest.raises(SlideOpenError, match=r"broken\.svs.*openslide.*tiffslide"):
        open_slide(bad)
    with pytest.raises(FileNotFoundError, match="slide not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(ValueError, match="reader must be"):
        open_slide(bad, reader="pillow")


def test_thumbnail_downsample_is_exact(cohort):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_slide(cohort["slides_dir"] / "slide_000.tif") as slide:
            thumb, (dx, dy) = slide.thumbnail_at_mpp(4.0)
    assert thumb.shape == (96, 128, 3) and (dx, dy) == (16.0, 16.0)


def test_large_thumbnails_are_read_in_blocks():
    rng = np.random.default_rng(0)
    img = np.repeat(np.repeat(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), 8, 0), 8, 1)  # 480 × 640
    whole = ArrayReader(img, mpp=0.5)
    blocks = ArrayReader(img, mpp=0.5)
    blocks.max_read_pixels = 100 * 100  # forces 1-level reads in blocks
    for ds in (8.0, 5.0):
        a, da = whole.thumbnail_at_downsample(ds)
        b, db = blocks.thumbnail_at_downsample(ds)
        assert a.shape == b.shape and da == db
        assert np.abs(a.astype(int) - b.astype(int)).mean() < (0.5 if ds == 8.0 else 12)
    np.testing.assert_array_equal(blocks.thumbnail_at_downsample(8.0)[0], img[::8, ::8])


def test_a_level_that_is_the_thumbnail_is_copied_in_blocks_exactly(cohort):
    """No resize needed: the thumbnail is copied block by block (bounded memory), equal to one whole read."""
    path = cohort["slides_dir"] / "slide_000.tif"
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend) as whole, open_slide(path, backend) as blocks:
            # 2048 × 1536 at 1 µm/px is its 4× level, 512 × 384: 6 × 4 blocks of 100², the last ones partial
            blocks.copy_block = 100
            calls: list[tuple] = []
            read = blocks.read_region

            def counted(*a, calls=calls, read=read):
                calls.append(a)
                return read(*a)

            blocks.read_region = counted
            a, da = whole.thumbnail_at_mpp(1.0, resize="area")
            b, db = blocks.thumbnail_at_mpp(1.0, resize="area")
        np.testing.assert_array_equal(a, b)
        assert a.shape == (384, 512, 3) and da == db == (4.0, 4.0) and len(calls) == 24
        assert max(w * h for _, _, (w, h) in calls) == 100 * 100


def _cache_is_this_process() -> bool:
    with open_slide(_FORK_SLIDE[0], "openslide"):
        return backends_mod._CACHE is not None and backends_mod._CACHE[0] == os.getpid()


_FORK_SLIDE: list = []


def test_openslide_handles_share_one_bounded_cache_per_process(cohort, monkeypatch):
    """Every OpenSlide handle of a process uses one tile cache (not 32 MiB per slide); a forked worker
    makes its own; the pixels do not depend on the cache's size; a bad size is a clear error."""
    a_path, b_path = cohort["slides_dir"] / "slide_000.tif", cohort["slides_dir"] / "slide_001.tif"
    monkeypatch.setattr(backends_mod, "_CACHE", None)
    with open_slide(a_path, "openslide") as a, open_slide(b_path, "openslide") as b:
        assert backends_mod._CACHE is not None and backends_mod._CACHE[0] == os.getpid()
        shared = backends_mod.openslide_cache()
        assert backends_mod.openslide_cache() is shared  # the same object for every later handle
        ref_a, ref_b = a.read_region((100, 50), 0, (300, 200)), b.read_region((0, 0), 1, (256, 256))
    monkeypatch.setattr(backends_mod, "_CACHE", None)
    monkeypatch.setenv("NEEDLEWORK_OPENSLIDE_CACHE_MB", "0")
    with open_slide(a_path, "openslide") as a, open_slide(b_path, "openslide") as b:
        np.testing.assert_array_equal(a.read_region((100, 50), 0, (300, 200)), ref_a)
        np.testing.assert_array_equal(b.read_region((0, 0), 1, (256, 256)), ref_b)
    _FORK_SLIDE[:] = [a_path]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_cache_is_this_process)  # the child's cache, not the parent's
    monkeypatch.setattr(backends_mod, "_CACHE", None)
    monkeypatch.setenv("NEEDLEWORK_OPENSLIDE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match=r"NEEDLEWORK_OPENSLIDE_CACHE_MB='lots'.*MiB"):
        open_slide(a_path, "openslide")


def test_an_openslide_without_shared_caches_still_opens_slides(cohort, monkeypatch):
    """OpenSlide before 4.0 cannot make an ``OpenSlideCache``: the slide opens with its own cache."""
    import openslide

    def refuse(*a, **k):
        raise RuntimeError("simulated OpenSlide 3.4: no shared caches")

    monkeypatch.setattr(backends_mod, "_CACHE", None)
    monkeypatch.setattr(openslide, "OpenSlideCache", refuse)
    with open_slide(cohort["slides_dir"] / "slide_000.tif", "openslide") as slide:
        assert slide.backend == "openslide" and slide.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)
