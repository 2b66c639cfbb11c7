"""needle-crop extraction (nCAMELYON-style)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from needlework.io.geojson import read_polygons
from needlework.slides.crops import (
    CropConfig,
    balance_crops,
    camelyon_split,
    extract_slide_crops,
    lesion_mask_from_polygons,
    positive_positions,
)


def test_positive_positions_contain_the_whole_component_and_respect_o2i():
    rng = np.random.default_rng(0)
    mask = np.zeros((200, 300), bool)
    mask[20:30, 40:52] = True  # 120 px
    mask[150:190, 200:260] = True  # 2400 px: too big for size 32 at high = 0.5
    mask[100:104, 5:9] = True  # 16 px near the left edge
    size, o2i = 32, (0.01, 0.5)
    pos = positive_positions(mask, size, o2i, rng, max_per_component=20)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    assert {c for *_, c in pos} == {1, 2}  # component 3 (raster order) is skipped: area > high · size²
    for r, c, ratio, comp in pos:
        crop = mask[r : r + size, c : c + size]
        assert ratio == pytest.approx(crop.mean()) and o2i[0] < ratio < o2i[1]
        assert (labels[r : r + size, c : c + size] == comp).sum() == (labels == comp).sum()  # fully inside
    assert len({(r, c) for r, c, *_ in pos}) == len(pos) and sum(c == 1 for *_, c in pos) == 20


def test_range_includes_the_last_row_position():
    """The reference's lower end ``bottom − size`` would cut the component's last row; ours does not."""
    mask = np.zeros((50, 50), bool)
    mask[30:40, 30:40] = True  # bottom = 39, right = 39
    pos = positive_positions(mask, 10, (0.5, 1.01), np.random.default_rng(0), max_per_component=50)
    assert [(r, c) for r, c, *_ in pos] == [(30, 30)]  # the only crop holding all 100 pixels


def test_extract_crops_from_the_cohort(cohort, tmp_path):
    cfg = CropConfig(size=64, target_mpp=1.0, o2i=(0.01, 0.5), max_per_component=3, negatives_per_slide=4)
    pos_id = next(s for s, m in cohort["slides"].items() if m["label"] == 1 and s != "slide_003")
    neg_id = next(s for s, m in cohort["slides"].items() if m["label"] == 0 and s != "slide_003")
    ann = cohort["annotations_dir"] / f"{pos_id}.geojson"
    rows = extract_slide_crops(cohort["slides_dir"] / f"{pos_id}.tif", tmp_path, cfg, ann)
    assert rows and all(r["label"] == 1 and r["size_level0"] == 256 for r in rows)
    # Independent check of O2I on a level-0 rasterisation of the annotation.
    full = lesion_mask_from_polygons(read_polygons(ann), (1536, 2048), 1.0)
    for r in rows:
        o2i = full[r["y"] : r["y"] + 256, r["x"] : r["x"] + 256].mean()
        assert 0.01 < o2i < 0.5 and abs(o2i - r["o2i"]) < 0.02
        assert Image.open(tmp_path / r["file"]).size == (64, 64)
    neg = extract_slide_crops(cohort["slides_dir"] / f"{neg_id}.tif", tmp_path, cfg, negative=True)
    assert len(neg) == 4
    for r in neg:
        img = np.asarray(Image.open(tmp_path / r["file"]))
        assert img[..., 1].mean() <= 200 and not (img.sum(2) == 0).any()  # tissue, not background
    balanced = balance_crops(rows + neg, key=None)
    assert sum(r["label"] for r in balanced) == len(balanced) // 2
    with pytest.raises(ValueError, match="annotations"):
        extract_slide_crops(cohort["slides_dir"] / f"{pos_id}.tif", tmp_path, cfg)


def test_camelyon_centre_split():
    assert [camelyon_split(p) for p in (0, 19, 40, 59, 60, 79, 80, 99)] == [
        "train",
        "train",
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
