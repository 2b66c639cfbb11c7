"""Tissue segmentation, tile grids and patch files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from slide_helpers import TILING

from needlework.io.h5 import read_coords, write_patches_h5
from needlework.slides.reader import ArrayReader
from needlework.slides.synthetic import SyntheticSlideSpec, render_synthetic_slide
from needlework.slides.tiling import TilingConfig, grid_coords, tile_geometry, tile_slide, tissue_fractions
from needlework.slides.tissue import TissueParams, mask_from_geojson, mask_to_geojson, segment_tissue


def _true_mask(cohort, slide_id):
    spec = SyntheticSlideSpec(**cohort["slides"][slide_id]["spec"])
    return render_synthetic_slide(spec)


def test_tissue_mask_matches_planted_tissue(cohort):
    image, tissue, _ = _true_mask(cohort, "slide_001")
    slide = ArrayReader(image, mpp=0.25)
    thumb, (dx, dy) = slide.thumbnail_at_mpp(4.0)
    mask = segment_tissue(thumb, 4.0)
    truth = tissue.reshape(thumb.shape[0], int(dy), thumb.shape[1], int(dx)).mean(axis=(1, 3)) > 0.5
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95, iou
    assert (mask != truth).mean() < 0.02


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    blank = (241 + rng.integers(-3, 4, size=(256, 256, 1))).repeat(3, axis=2).astype(np.uint8)
    assert not segment_tissue(blank, 4.0).any()
    res = tile_slide(ArrayReader(np.repeat(np.repeat(blank, 8, 0), 8, 1), mpp=0.5), TILING)
    assert len(res.coords) == 0 and res.attrs["tissue_area_mm2"] == 0


def test_segmentation_parameters_are_used():
    thumb = np.full((64, 64, 3), 240, np.uint8)
    thumb[10:30, 10:30] = (200, 120, 170)  # a tissue piece of 20 × 20 px = 25,600 µm² at 8 µm/px
    thumb[18:22, 18:22] = 240  # a hole
    thumb[50:53, 50:53] = (200, 120, 170)  # a speck of 3 × 3 px
    base = dict(median_um=0, close_um=0, open_um=0)
    mask = segment_tissue(thumb, 8.0, TissueParams(min_area_um2=0, fill_holes=False, **base))
    assert mask[50, 50] and not mask[20, 20]
    mask = segment_tissue(thumb, 8.0, TissueParams(min_area_um2=1000, fill_holes=True, **base))
    assert not mask[51, 51] and mask[20, 20]
    mask = segment_tissue(thumb, 8.0, TissueParams(min_area_um2=0, max_hole_area_um2=100, **base))
    assert not mask[20, 20]  # the hole (1024 µm²) is larger than the limit
    assert not segment_tissue(thumb, 8.0, TissueParams(threshold=0.9, **base)).any()
    with pytest.raises(ValueError, match="uint8"):
        segment_tissue(thumb.astype(np.float32), 8.0)


def test_tile_coordinates_match_the_planted_layout(cohort, job):
    coords, attrs = read_coords(job["tiling_dir"] / "patches" / "slide_001_patches.h5")
    _, tissue, _ = _true_mask(cohort, "slide_001")
    ps0 = 256  # 128 px at 20× on a 0.25 µm/px (40×) slide
    assert attrs["patch_size_level0"] == ps0 and attrs["patch_size"] == 128
    grid = grid_coords(2048, 1536, ps0, ps0)
    # Independent reference: exact tissue fraction of every grid tile from the level-0 planted mask.
    true_frac = np.array([tissue[y : y + ps0, x : x + ps0].mean() for x, y in grid])
    kept = {tuple(c) for c in coords.tolist()}
    for (x, y), f in zip(grid.tolist(), true_frac):
        if f > TILING.min_tissue_fraction + 0.08:
            assert (x, y) in kept, (x, y, f)
        elif f < TILING.min_tissue_fraction - 0.08:
            assert (x, y) not in kept, (x, y, f)
    assert coords.dtype == np.int64 and (coords % ps0 == 0).all()


def test_tissue_fractions_are_exact_for_fractional_downsamples():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 17)) > 0.5
    ds = (10 / 3, 10 / 3)  # thumbnail pixel = 10/3 level-0 pixels
    coords = np.array([[0, 0], [7, 5], [20, 11], [33, 26]])
    got = tissue_fractions(mask, ds, coords, 10)
    # Reference: upsample the mask 3× (one fine pixel = 10/9 level-0 px) and count fine pixels.
    fine = np.kron(mask, np.ones((3, 3)))
    for (x, y), g in zip(coords, got):
        # level-0 box [x, x+10) → fine box [x·0.9, (x+10)·0.9); use a 90× finer grid to be exact.
        finer = np.kron(fine, np.ones((10, 10)))  # one cell = 1/9 level-0 px
        box = finer[y * 9 : (y + 10) * 9, x * 9 : (x + 10) * 9]
        assert g == pytest.approx(box.mean(), abs=1e-6)


def test_geometry_from_magnification_and_mpp():
    assert tile_geometry(0.25, TilingConfig(target_magnification=20, patch_size=256)) == (512, 512)
    assert tile_geometry(0.25, TilingConfig(target_mpp=1.0, patch_size=224, overlap=32)) == (896, 768)
    assert tile_geometry(0.5, TilingConfig(target_magnification=20, patch_size=256)) == (256, 256)
    assert TilingConfig(target_mpp=0.5, patch_size=256).dir_name() == "20x_256px_0px_overlap"
    assert grid_coords(1000, 600, 512, 256).tolist() == [[0, 0], [256, 0]]
    with pytest.raises(ValueError, match="overlap"):
        TilingConfig(patch_size=256, overlap=256)
    with pytest.raises(ValueError, match="target_magnification or target_mpp"):
        TilingConfig(target_magnification=None)


def test_overlap_gives_denser_grid_and_upsampling_warns():
    img = np.full((600, 800, 3), (200, 120, 170), np.uint8)
    res = tile_slide(
        ArrayReader(img, mpp=0.5),
        TilingConfig(target_magnification=20, patch_size=200, overlap=100),
        TissueParams(min_area_um2=0),
    )
    assert res.attrs["stride_level0"] == 100 and len(res.coords) == 7 * 5
    with pytest.warns(UserWarning, match="coarser than the requested"):
        tile_slide(ArrayReader(img, mpp=0.5), TilingConfig(target_magnification=40, patch_size=64))


def test_contours_round_trip_through_geojson(tmp_path):
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[25:35, 30:45] = False  # a hole stays a hole
    mask[52:58, 2:8] = True
    fc = mask_to_geojson(mask, (4.0, 4.0), tolerance=0.0)
    path = tmp_path / "tissue.geojson"
    import json

    path.write_text(json.dumps(fc))
    back = mask_from_geojson(path, mask.shape, (4.0, 4.0))
    assert (back != mask).mean() < 0.02 and not back[30, 37] and back[20, 20]


def test_patch_file_layout_trident_and_clam(tmp_path, job):
    with h5py.File(job["tiling_dir"] / "patches" / "slide_000_patches.h5") as f:
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.shape[1] == 2
        for key in (
            "patch_size",
            "patch_size_level0",
            "level0_magnification",
            "target_magnification",
            "overlap",
            "level0_width",
            "level0_height",
            "name",
            "mpp_level0",
            "reader",
            "code_hash",
            "config_hash",
        ):
            assert key in ds.attrs, key
        assert ds.attrs["name"] == "slide_000" and ds.attrs["level0_magnification"] == 40
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int32))
        d.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0], "name": "x"})
    coords, attrs = read_coords(clam)
    assert coords.dtype == np.int64 and attrs["patch_size_level0"] == 512
    write_patches_h5(tmp_path / "ours.h5", coords, {"patch_size_level0": 512, "name": "x"})
    assert not list(tmp_path.glob("*.tmp*"))


def test_segmentation_by_row_blocks_equals_one_pass(cohort, monkeypatch):
    """The per-pixel steps run in row blocks to bound memory; any block size gives the same mask."""
    from needlework.slides import tissue as tissue_mod

    image, _, _ = _true_mask(cohort, "slide_001")
    thumb, _ = ArrayReader(image, mpp=0.25).thumbnail_at_mpp(4.0)
    monkeypatch.setattr(tissue_mod, "ROW_BLOCK", 10**9)
    one_pass = segment_tissue(thumb, 4.0), tissue_mod.saturation(thumb)
    monkeypatch.setattr(tissue_mod, "ROW_BLOCK", 7)
    np.testing.assert_array_equal(segment_tissue(thumb, 4.0), one_pass[0])
    np.testing.assert_array_equal(tissue_mod.saturation(thumb), one_pass[1])
    assert one_pass[0].any() and not one_pass[0].all()


def test_component_labels_are_16_bit_unless_there_are_too_many():
    """uint16 labels (half the memory); 65,536 components or more fall back to int32, same sizes."""
    import cv2

    from needlework.slides.tissue import _components

    few = np.zeros((64, 64), np.uint8)
    few[5:20, 5:20] = 1
    few[30:40, 40:60] = 1
    labels, sizes = _components(few, 8)
    assert labels.dtype == np.uint16 and sorted(sizes[1:]) == [200, 225]
    many = np.zeros((600, 600), np.uint8)
    many[::2, ::2] = 1  # 90,000 isolated pixels
    labels, sizes = _components(many, 4)
    n, ref, _, _ = cv2.connectedComponentsWithStats(many, connectivity=4, ltype=cv2.CV_32S)
    assert labels.dtype == np.int32 and len(sizes) == n == 90_001
    np.testing.assert_array_equal(labels, ref)


def test_saturation_bins_equal_searchsorted_for_every_max_min_pair():
    """The integer bin table gives the bin ``searchsorted`` finds on the float saturation, for all
    32,896 (max, min) pairs of uint8 channels, and the float saturation is :func:`saturation`'s."""
    from needlework.slides.tissue import saturation, saturation_bins

    mx, mn = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    keep = mn <= mx
    rgb = np.zeros((1, int(keep.sum()), 3), np.uint8)
    rgb[0, :, 0], rgb[0, :, 1], rgb[0, :, 2] = mx[keep], mn[keep], (mx[keep] + mn[keep]) // 2
    sat, bins = saturation_bins(rgb)
    np.testing.assert_array_equal(sat, saturation(rgb))
    edges = np.linspace(0.0, 1.0, 257)
    ref = (np.searchsorted(edges, sat, side="right") - 1).clip(0, 255)
    np.testing.assert_array_equal(bins, ref)
    np.testing.assert_array_equal(np.bincount(bins.ravel(), minlength=256),
                                  np.histogram(sat, bins=256, range=(0.0, 1.0))[0])  # fmt: skip
    assert bins[0, (mx[keep] == 200) & (mn[keep] == 0)] == 255  # saturation 1: the last, closed bin


def test_hole_filling_by_flood_fill_equals_labelling_the_background():
    """Filling from the border frame keeps exactly the background 4-connected to the border, on random
    masks with holes, diagonal gaps and pieces touching the border."""
    from needlework.slides.tissue import _components, _fill_holes

    rng = np.random.default_rng(3)
    for density in (0.3, 0.5, 0.7):
        mask = (rng.random((61, 47)) < density).astype(np.uint8)
        labels, sizes = _components(1 - mask, 4)
        hole = np.ones(len(sizes), bool)
        hole[0] = False
        hole[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
        np.testing.assert_array_equal(_fill_holes(mask), mask | hole[labels])
    ring = np.zeros((9, 9), np.uint8)
    ring[2:7, 2:7] = 1
    ring[4, 4] = 0
    ring[3, 6] = 0  # a notch open to the outside through a 4-connected path: not a hole
    ring[3, 7:] = 0
    filled = _fill_holes(ring)
    assert filled[4, 4] == 1 and filled[3, 6] == 0 and filled.sum() == ring.sum() + 1
