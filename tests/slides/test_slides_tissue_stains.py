"""Tissue against background on IHC-like and H&E-like slides with known masks (recall and precision)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from stain_slides import recall_precision, stain_slide

from needlework.slides.reader import open_slide
from needlework.slides.synthetic import write_pyramidal_tiff
from needlework.slides.tiling import TilingConfig, tile_slide
from needlework.slides.tissue import TissueParams, segment_tissue


@pytest.mark.parametrize("kind", ["ihc", "he"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_finds_pale_and_stained_tissue(kind, seed):
    image, truth = stain_slide(kind, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default must not warn about its own coverage
        mask = segment_tissue(image, 4.0)
    recall, precision = recall_precision(mask, truth)
    assert recall >= 0.95 and precision >= 0.9, (kind, seed, recall, precision)


@pytest.mark.parametrize("kind", ["ihc", "he"])
def test_through_a_tiff_slide_and_the_tiler(kind, tmp_path):
    """The known mask, upsampled ×4, written as a 1024 × 768 TIFF at 1 µm/px: the tiler's 4 µm/px mask."""
    image, truth = stain_slide(kind, seed=4)
    big = np.repeat(np.repeat(image, 4, axis=0), 4, axis=1)
    path = write_pyramidal_tiff(tmp_path / f"{kind}.tif", big, 1.0, 256, 95, 256)
    with open_slide(path) as slide:
        res = tile_slide(slide, TilingConfig(target_mpp=1.0, patch_size=64), TissueParams())
    assert res.mask.shape == truth.shape
    recall, precision = recall_precision(res.mask, truth)
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)
    assert res.attrs["segmenter"] == "saturation-background"


def test_otsu_splits_stain_from_stain_on_ihc_and_says_so():
    """The old default on IHC: brown against pale, most pale tissue lost — now with a warning."""
    image, truth = stain_slide("ihc", seed=0)
    with pytest.warns(UserWarning, match=r"covers only \d+ % .*pale tissue may be missing"):
        mask = segment_tissue(image, 4.0, TissueParams(method="otsu"))
    assert recall_precision(mask, truth)[0] < 0.6


def test_blank_glass_has_no_tissue_and_bad_method_is_an_error():
    blank = np.clip(np.random.default_rng(0).normal(236, 3, (192, 256, 3)), 0, 255).astype(np.uint8)
    assert not segment_tissue(blank, 4.0).any()
    with pytest.raises(ValueError, match="method"):
        segment_tissue(blank, 4.0, TissueParams(method="triangle"))  # type: ignore[arg-type]
