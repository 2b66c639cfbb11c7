"""ATS, DPS and IPS on the pixels of whole-slide images: the patch reader, the lazy ``x_high``, the
``slide_images`` dataset, the pixel configs and their heatmaps (issue #14)."""

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("tifffile")

from needlework.cli import main as cli_main
from needlework.data.splits import create_splits
from needlework.ops.patches import extract_patches
from needlework.slides.patch_reader import (
    SlidePatchReader,
    SlidePixels,
    grid_to_level0,
    level0_to_grid,
)
from needlework.slides.pixel_data import SlideImageDataset, collate_slide_pixels
from needlework.slides.reader import available_readers, open_slide
from needlework.slides.synthetic import make_synthetic_cohort

READERS = [r for r, v in available_readers().items() if v is not None]
KW = {"low_mpp": 4.0, "high_mpp": 1.0, "patch_size": 32}  # level 0 is 0.25 µm/px: x_low 1/16, x_high 1/4
# the test slides are 192 µm wide: no morphology or minimum area (sized for millimetre-scale tissue)
TISSUE = {"min_area_um2": 0, "close_um": 0, "open_um": 0, "median_um": 0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    info = make_synthetic_cohort(
        root / "cohort", n_slides=6, width=768, height=512, slides_per_patient=1, lesion_radius=(16, 32)
    )
    create_splits(info["labels_csv"], root / "splits", k=3)
    info["splits_dir"] = root / "splits"
    info["root"] = root
    return info


def _kwargs(cohort, **extra):
    return {
        "slides_dir": str(cohort["slides_dir"]),
        "labels_csv": str(cohort["labels_csv"]),
        "mpp_csv": str(cohort["mpp_csv"]),
        **KW,
        "tissue": TISSUE,
        **extra,
    }


def _slide_path(cohort, i=0):
    return cohort["slides_dir"] / f"slide_{i:03d}.tif"


# ----------------------------------------------------------------------------------- the patch reader
@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("level", [0, 1])
def test_reader_patches_equal_read_region_of_the_same_place(cohort, backend, level):
    slide = open_slide(_slide_path(cohort), reader=backend)
    ds = slide.level_downsamples[level]
    assert ds == 2.0**level  # the synthetic pyramid halves exactly (768 × 512)
    reader = SlidePatchReader(_slide_path(cohort), reader=backend)
    corners = np.array([[0, 0], [37, 21], [100, 60]])
    patches = reader.read(corners, (24, 40), (ds, ds))
    for (x, y), patch in zip(corners, patches):
        ref = slide.read_region((int(x * ds), int(y * ds)), level, (40, 24))
        np.testing.assert_array_equal(patch, ref)


def test_reader_resizes_by_area_from_the_nearest_level(cohort):
    """A 4× downsample is read from level 1 (2×) and area-resized: close to the 4 × 4 block mean of
    level 0 (the two levels differ by their own JPEG errors)."""
    slide = open_slide(_slide_path(cohort))
    reader = SlidePatchReader(_slide_path(cohort))
    patch = reader.read([[20, 10]], 32, (4.0, 4.0))[0].astype(np.float64)
    full = slide.read_region((80, 40), 0, (128, 128)).astype(np.float64)
    block_mean = full.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(patch - block_mean).mean() < 3.0
    assert patch.std() > 5  # not a blank patch: the comparison means something


def test_patches_outside_the_slide_are_zero_like_extract_patches(cohort):
    """The lazy image gives exactly what extract_patches gives on the same raster held in memory,
    corners inside, across the border and wholly outside alike."""
    slide = open_slide(_slide_path(cohort))
    w1, h1 = slide.level_dimensions[1]
    image = torch.from_numpy(slide.read_region((0, 0), 1, (w1, h1))).permute(2, 0, 1)[None].float() / 255
    pixels = SlidePixels([SlidePatchReader(_slide_path(cohort))], [(2.0, 2.0)], (h1 + 40, w1 + 24))
    gen = torch.Generator().manual_seed(0)
    offsets = torch.stack(
        [
            torch.randint(-40, w1 + 10, (1, 50), generator=gen),
            torch.randint(-40, h1 + 10, (1, 50), generator=gen),
        ],
        dim=-1,
    )
    offsets[0, :3] = torch.tensor([[-64, -64], [w1 + 30, 0], [w1 - 5, h1 - 5]])
    got = extract_patches(pixels, offsets, 32)
    want = extract_patches(image, offsets, 32)
    assert got.shape == want.shape == (1, 50, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got[0, 0].abs().sum() == 0 and got[0, 1].abs().sum() == 0 and got[0, 2, :, 5:].abs().sum() == 0


def test_reader_pickles_without_handles_and_reads_in_threads(cohort):
    reader = SlidePatchReader(_slide_path(cohort), num_threads=3)
    corners = np.array([[i * 7, i * 5] for i in range(12)])
    first = reader.read(corners, 16, (2.0, 2.0))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._pool is None and clone.path == reader.path
    np.testing.assert_array_equal(clone.read(corners, 16, (2.0, 2.0)), first)
    serial = SlidePatchReader(_slide_path(cohort), num_threads=1).read(corners, 16, (2.0, 2.0))
    np.testing.assert_array_equal(serial, first)


# --------------------------------------------------------------------------------- the coordinates
def test_grid_level0_mapping_round_trips():
    gen = np.random.default_rng(0)
    xy = gen.uniform(-50, 5000, size=(100, 2))
    for ds in [(1.0, 1.0), (4.0, 4.0), (16.0123, 15.9871), (0.5, 3.0)]:
        np.testing.assert_allclose(level0_to_grid(grid_to_level0(xy, ds), ds), xy, rtol=1e-12)
        np.testing.assert_allclose(grid_to_level0(level0_to_grid(xy, ds), ds), xy, rtol=1e-12)
    assert grid_to_level0([[3, 2]], (4.0, 2.5)).tolist() == [[12.0, 5.0]]


def test_low_and_high_rasters_meet_at_the_same_level0_point():
    """The models map x_low to x_high by the shape ratio; both then land on the same level-0 point,
    also for odd sizes, a non-integer ratio and per-axis downsamples."""
    reader = SlidePatchReader("unused.tif")
    low_ds = (16.0 * 1001 / 1000, 16.0 * 750 / 751)
    for ratio in (16.0, 8.0, 5.3):
        px = SlidePixels.from_low([reader], [low_ds], (751, 1000), ratio)
        big_h, big_w = px.size
        p_low = np.array([[0.0, 0.0], [10.5, 3.25], [999.0, 750.0]])
        p_high = p_low * np.array([big_w / 1000, big_h / 751])
        np.testing.assert_allclose(px.to_level0(p_high[None])[0], grid_to_level0(p_low, low_ds), rtol=1e-12)


def test_dataset_views_map_onto_the_slide(cohort):
    """x_low pixel (x, y) is the level-0 box at grid_to_level0((x, y)); the tissue mask covers tissue."""
    ds = SlideImageDataset("all", **_kwargs(cohort, mask_low=False))
    item = ds[0]
    dx, dy = item["low_downsample"].tolist()
    slide = open_slide(_slide_path(cohort))
    assert (dx, dy) == (16.0, 16.0) and item["x_low"].shape[1:] == (32, 48)
    x0, y0 = grid_to_level0([10, 7], (dx, dy)).astype(int)
    box = slide.read_region((int(x0), int(y0)), 0, (16, 16)).astype(np.float64).mean(axis=(0, 1)) / 255
    assert item["x_low"].dtype == torch.uint8  # 3 bytes a pixel; the networks convert tile by tile
    np.testing.assert_allclose(item["x_low"][:, 7, 10].numpy() / 255, box, atol=0.03)
    # x_high is x_low's raster at 4× the resolution
    assert item["x_high"].shape == (1, 3, 128, 192) and item["x_high"].downsamples == [(4.0, 4.0)]
    masked = SlideImageDataset("all", **_kwargs(cohort))[0]
    assert torch.equal(masked["x_low"], (item["x_low"] * item["tissue"]).to(torch.uint8))
    assert item["tissue"].dtype == torch.uint8 and 0.02 < float(item["tissue"].float().mean()) < 0.9


def test_dataset_errors_are_clear(cohort, tmp_path):
    with pytest.raises(ValueError, match="slides_dir"):
        SlideImageDataset("all", labels_csv=str(cohort["labels_csv"]))
    with pytest.raises(ValueError, match="high_mpp <= low_mpp"):
        SlideImageDataset("all", **{**_kwargs(cohort), "high_mpp": 8.0})
    with pytest.raises(ValueError, match="splits_dir"):
        SlideImageDataset("train", **_kwargs(cohort))
    (tmp_path / "slides").mkdir()
    with pytest.raises(FileNotFoundError, match="no file in"):
        SlideImageDataset("all", **{**_kwargs(cohort), "slides_dir": str(tmp_path / "slides")})


def _batches(cohort, workers):
    ds = SlideImageDataset("all", **_kwargs(cohort))
    loader = DataLoader(
        ds, batch_size=3, num_workers=workers, collate_fn=collate_slide_pixels, timeout=120 if workers else 0
    )
    offsets = torch.tensor([[[0, 0], [60, 30], [170, 100], [-8, 120]]] * 3)
    return [(b, extract_patches(b["x_high"], offsets, 32)) for b in loader]


def test_same_batches_with_0_and_2_workers(cohort):
    serial, parallel = _batches(cohort, 0), _batches(cohort, 2)
    assert len(serial) == len(parallel) == 2
    for (a, pa), (b, pb) in zip(serial, parallel):
        assert a["slide_id"] == b["slide_id"]
        for key in ("x_low", "tissue", "label", "low_downsample"):
            assert torch.equal(a[key], b[key]), key
        assert a["x_high"].size == b["x_high"].size and a["x_high"].downsamples == b["x_high"].downsamples
        assert torch.equal(pa, pb) and pa.abs().sum() > 0


# ----------------------------------------------------------------------------- models and configs
def test_ips_scans_only_tissue_patches(cohort):
    import needlework

    batch = collate_slide_pixels([SlideImageDataset("all", **_kwargs(cohort))[i] for i in (0, 1)])
    model = needlework.create_model(
        "ips", in_channels=3, patch_size=32, n_keep=3, chunk_size=8, dim=16, d_k=8, n_heads=2, d_inner=32
    )
    out = model(x_high=batch["x_high"], tissue=batch["tissue"])
    cand = out["candidate_coords"]
    h, w = batch["x_high"].size
    all_patches = (h // 32) * (w // 32)
    assert 0 < len(cand) < all_patches
    tissue = batch["tissue"][:, 0] > 0
    rows = ((cand[:, 1] + 16) * tissue.shape[1] // h).long()
    cols = ((cand[:, 0] + 16) * tissue.shape[2] // w).long()
    assert bool(tissue[:, rows, cols].any(0).all())  # every scanned patch is centred on tissue
    assert out["attention"].shape == (2, len(cand))


@pytest.mark.parametrize("method", ["ats", "dps", "ips"])
def test_pixel_config_runs_one_step(cohort, method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = "--data.init_args.dataset_kwargs."
    args = ["fit", "--config", f"slides/{method}_pixels",
            f"{d}slides_dir", str(cohort["slides_dir"]), f"{d}labels_csv", str(cohort["labels_csv"]),
            f"{d}splits_dir", str(cohort["splits_dir"]), f"{d}mpp_csv", str(cohort["mpp_csv"]),
            f"{d}tissue", json.dumps(TISSUE), "--data.init_args.num_workers", "0",
            "--trainer.fast_dev_run", "true", "--runs_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert cli_main(args) == 0


# ---------------------------------------------------------------------------------------- heatmaps
@pytest.mark.parametrize("method", ["ats", "dps", "ips"])
def test_pixel_heatmaps_png_h5_geojson(cohort, method, tmp_path):
    import h5py

    import needlework
    from needlework.slides.pixel_heatmap import export_pixel_heatmap

    models = {
        "ats": (
            "ats.cnn",
            dict(
                n_patches=4, patch_size=32, dim=16, attention=dict(channels=[8], pool_after=[0], cell_pool=2)
            ),
        ),
        "dps": (
            "dps",
            dict(cell_size=32, pos_encoding="none", patch_size=32, k=2, n_samples=5, dim=16, n_heads=2),
        ),
        "ips": ("ips", dict(patch_size=32, n_keep=3, chunk_size=8, dim=16, d_k=8, n_heads=2, d_inner=32)),
    }
    name, kwargs = models[method]
    torch.manual_seed(0)
    model = needlework.create_model(name, in_channels=3, **kwargs)
    ds = SlideImageDataset("all", **_kwargs(cohort))
    batch = collate_slide_pixels([ds[0], ds[1]])
    written = export_pixel_heatmap(model, batch, tmp_path, index=1, max_side=256)
    assert set(written) == {"png", "h5", "geojson"}
    slide = open_slide(_slide_path(cohort, int(batch["slide_id"][1][-3:])))
    w0, h0 = slide.dimensions
    with h5py.File(written["h5"]) as f:
        coords, scores = f["coords"][:], f["scores"][:]
        side = int(f["scores"].attrs["patch_size_level0"])
    assert len(coords) == len(scores) > 0
    assert (coords >= 0).all() and (coords[:, 0] < w0).all() and (coords[:, 1] < h0).all()
    expected = {"ats": 4 * 16, "dps": 32 * 4, "ips": 32 * 4}[method]  # cell or patch side in level-0 px
    assert side == expected
    if method == "ats":  # the whole attention map over the slide: sums to ~1 minus the padding's share
        assert 0.5 < scores.sum() <= 1.0 + 1e-5
    features = json.loads(written["geojson"].read_text())["features"]
    assert len(features) == len(scores)
    from PIL import Image

    assert Image.open(written["png"]).size[0] >= 192


def test_a_batch_of_one_slide_is_not_copied(cohort):
    """Slides train at batch 1: the batch holds the item's own low view (no second copy of it)."""
    item = SlideImageDataset("all", **_kwargs(cohort))[0]
    batch = collate_slide_pixels([item])
    assert batch["x_low"].shape == (1, *item["x_low"].shape) and batch["x_low"].dtype == torch.uint8
    assert batch["x_low"].data_ptr() == item["x_low"].data_ptr()
    assert batch["tissue"].data_ptr() == item["tissue"].data_ptr()


def test_items_without_the_low_image_batch_alike(cohort):
    """``low_image=False`` (IPS): no ``x_low`` in items or batches; the tissue mask, ``x_high`` and the
    candidates IPS scans are those of the full items."""
    import needlework

    full = SlideImageDataset("all", **_kwargs(cohort))
    lean = SlideImageDataset("all", **_kwargs(cohort), low_image=False)
    assert "x_low" not in lean[0] and "x_low" in full[0]
    for n in (1, 2):
        a = collate_slide_pixels([full[i] for i in range(n)])
        b = collate_slide_pixels([lean[i] for i in range(n)])
        assert "x_low" not in b and set(a) - set(b) == {"x_low"}
        assert torch.equal(a["tissue"], b["tissue"]) and a["x_high"].size == b["x_high"].size
    model = needlework.create_model(
        "ips", in_channels=3, patch_size=32, n_keep=3, chunk_size=8, dim=16, d_k=8, n_heads=2, d_inner=32
    )
    assert torch.equal(
        model(x_high=a["x_high"], tissue=a["tissue"])["candidate_coords"],
        model(x_high=b["x_high"], tissue=b["tissue"])["candidate_coords"],
    )


def test_a_large_view_is_segmented_on_a_coarser_copy(cohort):
    """Views wider than ``segment_max_side`` are segmented on an area-downsampled copy (the same function
    on it, the mask scaled back by nearest neighbour); smaller views exactly as before; the coarser mask
    agrees with the full one on nearly every pixel."""
    import cv2

    from needlework.slides.pixel_data import low_resolution_view, tissue_at_most
    from needlework.slides.tissue import TissueParams, segment_tissue

    slide = open_slide(_slide_path(cohort))
    params = TissueParams(min_area_um2=0)
    full = low_resolution_view(slide, 2.0, tissue=params, segment_max_side=4096)
    h, w = full.tissue.shape
    assert max(h, w) >= 64
    assert np.array_equal(full.tissue, segment_tissue(full.image, full.mpp, params))
    coarse = low_resolution_view(slide, 2.0, tissue=params, segment_max_side=max(h, w) // 3)
    assert np.array_equal(coarse.image, full.image) and coarse.tissue.shape == (h, w)
    small = cv2.resize(full.image, (-(-w // 3), -(-h // 3)), interpolation=cv2.INTER_AREA)
    mpp = full.mpp * (h / small.shape[0] + w / small.shape[1]) / 2
    small_mask = segment_tissue(small, mpp, params).view(np.uint8)
    up = cv2.resize(small_mask, (w, h), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(coarse.tissue, up.view(bool))
    assert full.tissue.any() and (coarse.tissue == full.tissue).mean() > 0.95
    assert np.array_equal(tissue_at_most(full.image, full.mpp, params, 10**6), full.tissue)
    with pytest.raises(ValueError, match="segment_max_side"):
        low_resolution_view(slide, 2.0, segment_max_side=0)
